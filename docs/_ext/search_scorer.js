/* The book's search ranking (conf.py: html_search_scorer).
 *
 * Sphinx's default gives an index entry that equals the query a score of
 * 100, so a glossary term outranks the chapter about it, and an API object
 * outranks it too.  A reader who types "signalfd" wants the chapter first,
 * then the glossary and the API.  So: a page whose title names every word
 * searched for goes up, chapters go before reference pages, and index
 * entries are capped below both.  tests/test_book_browser.py checks the order.
 */
var Scorer = {
  score: (result) => {
    const [docname, title, , , score, , kind] = result;
    const query = new URLSearchParams(window.location.search).get("q") || "";
    const words = query.toLowerCase().split(/\s+/).filter((w) => w.length > 0);
    const where = (title || "").toLowerCase();
    let s = score;
    if (kind === "index") s = Math.min(s, 30);
    if (docname.startsWith("notebooks/")) s += 20;
    if (words.length && words.every((w) => where.includes(w))) s += 10;
    return s;
  },
  // The rest are Sphinx's defaults (sphinx/themes/basic/static/searchtools.js).
  objNameMatch: 11,
  objPartialMatch: 6,
  objPrio: { 0: 15, 1: 5, 2: -5 },
  objPrioDefault: 0,
  title: 15,
  partialTitle: 7,
  term: 5,
  partialTerm: 2,
};
