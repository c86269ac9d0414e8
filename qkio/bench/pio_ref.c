/* pio_ref.c: the floor for `qkio bench pio` -- the same guest, the same
 * KVM_RUN loop, in C.
 *
 *   pio_ref GUEST.ELF COUNT|CMDLINE [IOEVENTFD_PORT] [--no-pit] [--ram-mib=N]
 *
 * Builds a VM shaped like qkio's (TSS and identity map, in-kernel irqchip
 * and PIT, 8 MiB of RAM at 0), loads the Multiboot ELF's PT_LOAD segments,
 * enters it in 32-bit protected mode with flat segments as a Multiboot
 * loader does (EAX = 0x2BADB002, EBX -> an information structure carrying
 * only the command line: "count=COUNT", or CMDLINE as given if it is not a
 * plain number, e.g. "count=1000 port=1280"), and loops on KVM_RUN:
 *
 *   KVM_EXIT_IO to port 0xf4   -> the guest is done: stop
 *   an OUT to 0x3f8 (COM1)     -> keep the byte: the guest's console output
 *   any other KVM_EXIT_IO      -> count it, do nothing else: an OUT is dropped,
 *                                 an IN reads all ones (a port nobody owns;
 *                                 for the UART's line status: "ready")
 *   anything else              -> fail
 *
 * With IOEVENTFD_PORT, a KVM_IOEVENTFD is registered on that port first, so
 * the guest's OUTs there complete inside the kernel.  --no-pit leaves out the
 * in-kernel PIT and --ram-mib=N gives N MiB of RAM (default 8): the shape of
 * `qkio run`'s own VM, for `qkio bench startup`, which times this program's
 * whole run of the hello guest as the part of a run that is KVM's.  (hello
 * polls the UART's line status with IN; all ones says "ready".)
 *
 * It prints one JSON line: {"exits": E, "seconds": S, "tsc_khz": F,
 * "console": "..."}, S being the time from just before the first KVM_RUN to
 * just after the last one (CLOCK_MONOTONIC), F the rate of the guest's time
 * stamp counter (KVM_GET_TSC_KHZ: what pio-loop's chunk=K cycles are counted
 * in) and console the bytes written to COM1 (printable ASCII and newlines; a
 * byte outside that range is written as '?').  Setup and teardown are
 * outside S.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t RAM_SIZE = 8u << 20;
#define MBI_ADDR   0x8000u
#define CMDLINE    0x8100u
#define DEBUG_EXIT 0xf4
#define COM1       0x3f8
#define CONSOLE_MAX 65536

static void die(const char *what)
{
    fprintf(stderr, "pio_ref: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *what)
{
    fprintf(stderr, "pio_ref: %s\n", what);
    exit(2);
}

static int xioctl(int fd, unsigned long req, unsigned long arg, const char *name)
{
    int r = ioctl(fd, req, arg);
    if (r < 0)
        die(name);
    return r;
}

/* Copy the ELF's PT_LOAD segments into guest RAM; return its entry point. */
static uint32_t load_elf(const char *path, uint8_t *ram)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die(path);
    uint8_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED)
        die("mmap ELF");
    Elf32_Ehdr *eh = (Elf32_Ehdr *)file;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS32)
        fail("not a 32-bit ELF file");
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf32_Phdr *ph = (Elf32_Phdr *)(file + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD)
            continue;
        if ((uint64_t)ph->p_paddr + ph->p_memsz > RAM_SIZE)
            fail("segment outside guest RAM");
        memcpy(ram + ph->p_paddr, file + ph->p_offset, ph->p_filesz);
        memset(ram + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    uint32_t entry = eh->e_entry;
    munmap(file, st.st_size);
    close(fd);
    return entry;
}

static void flat_segment(struct kvm_segment *s, uint16_t selector, uint8_t type)
{
    memset(s, 0, sizeof *s);
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = selector;
    s->type = type;
    s->present = 1;
    s->dpl = 0;
    s->db = 1;
    s->s = 1;
    s->g = 1;
}

int main(int argc, char **argv)
{
    int pit_wanted = 1;
    const char *ioeventfd_port = NULL;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--no-pit"))
            pit_wanted = 0;
        else if (!strncmp(argv[i], "--ram-mib=", 10))
            RAM_SIZE = strtoull(argv[i] + 10, NULL, 0) << 20;
        else if (argv[i][0] != '-' && !ioeventfd_port)
            ioeventfd_port = argv[i];
        else
            argc = 0;  /* unknown: usage */
    }
    if (argc < 3 || RAM_SIZE < (2u << 20))
        fail("usage: pio_ref GUEST.ELF COUNT|CMDLINE [IOEVENTFD_PORT] [--no-pit] [--ram-mib=N]");
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
    xioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000, "KVM_SET_TSS_ADDR");
    uint64_t idmap = 0xfffbc000;
    xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, (unsigned long)&idmap, "KVM_SET_IDENTITY_MAP_ADDR");
    xioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (pit_wanted)
        xioctl(vm, KVM_CREATE_PIT2, (unsigned long)&pit, "KVM_CREATE_PIT2");

    uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap RAM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)ram,
    };
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, (unsigned long)&region, "KVM_SET_USER_MEMORY_REGION");

    uint32_t entry = load_elf(argv[1], ram);
    uint32_t *mbi = (uint32_t *)(ram + MBI_ADDR);
    memset(mbi, 0, 0x100);
    mbi[0] = 1u << 2;          /* flags: cmdline is valid */
    mbi[4] = CMDLINE;          /* offset 16: cmdline */
    if (strspn(argv[2], "0123456789") == strlen(argv[2]))
        snprintf((char *)ram + CMDLINE, 256, "count=%s", argv[2]);
    else
        snprintf((char *)ram + CMDLINE, 256, "%s", argv[2]);

    if (ioeventfd_port) {
        int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (efd < 0)
            die("eventfd");
        struct kvm_ioeventfd ioe = {
            .addr = strtoul(ioeventfd_port, NULL, 0), .len = 1, .fd = efd,
            .flags = KVM_IOEVENTFD_FLAG_PIO,
        };
        xioctl(vm, KVM_IOEVENTFD, (unsigned long)&ioe, "KVM_IOEVENTFD");
    }

    int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sregs;
    xioctl(vcpu, KVM_GET_SREGS, (unsigned long)&sregs, "KVM_GET_SREGS");
    flat_segment(&sregs.cs, 0x10, 0xb);     /* code, execute/read, accessed */
    flat_segment(&sregs.ds, 0x18, 0x3);     /* data, read/write, accessed */
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 = 0x11;                       /* PE | ET, caches on */
    xioctl(vcpu, KVM_SET_SREGS, (unsigned long)&sregs, "KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = entry, .rflags = 2, .rax = 0x2BADB002, .rbx = MBI_ADDR };
    xioctl(vcpu, KVM_SET_REGS, (unsigned long)&regs, "KVM_SET_REGS");

    int tsc_khz = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);  /* -1 if the kernel cannot say */
    static char console[CONSOLE_MAX + 1];
    size_t console_len = 0;

    /* The loop being measured. */
    long exits = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        exits++;
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "pio_ref: unexpected exit reason %u\n", run->exit_reason);
            return 2;
        }
        if (run->io.port == DEBUG_EXIT)
            break;
        if (run->io.port == COM1 && run->io.direction == KVM_EXIT_IO_OUT) {
            const uint8_t *data = (const uint8_t *)run + run->io.data_offset;
            for (uint32_t i = 0; i < (uint32_t)run->io.size * run->io.count; i++)
                if (console_len < CONSOLE_MAX)
                    console[console_len++] = data[i] == '\n' || (data[i] >= ' ' && data[i] < 0x7f)
                                             ? (char)data[i] : '?';
            continue;
        }
        /* A port nobody owns: an OUT is dropped, an IN reads all ones. */
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset((uint8_t *)run + run->io.data_offset, 0xff,
                   (size_t)run->io.size * run->io.count);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("{\"exits\": %ld, \"seconds\": %.9f, \"tsc_khz\": %d, \"console\": \"", exits,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, tsc_khz);
    for (size_t i = 0; i < console_len; i++) {  /* JSON: only '\n', '"' and '\\' need escaping */
        if (console[i] == '\n')
            fputs("\\n", stdout);
        else if (console[i] == '"' || console[i] == '\\')
            printf("\\%c", console[i]);
        else
            putchar(console[i]);
    }
    puts("\"}");
    return 0;
}
