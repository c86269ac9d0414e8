"""A thin, documented layer over /dev/kvm."""
