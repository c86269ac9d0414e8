"""virtio on the MMIO bus: the transport, the split virtqueue, virtio-blk, and who runs it.

* :mod:`.virtqueue` -- the split virtqueue as the device sees it: pop a
  descriptor chain the driver made available, push it back used.  Every guest
  address goes through :class:`~qkio.kvm.memory.GuestMemory`'s bounds check.
* :mod:`.mmio` -- the virtio-mmio transport (register layout version 2) and
  where QEMU's ``microvm`` machine puts its transports.
* :mod:`.blk` -- virtio-blk backed by a raw image file.
* :mod:`.iothread` -- an IOThread: a thread with its own event loop, which
  takes the guest's notify from an ioeventfd and answers through an irqfd,
  never touching the global lock.
* :mod:`.board` -- plugging it into a :class:`~qkio.machine.Machine` in one
  of three notify modes (``vcpu``, ``main``, ``iothread``).
"""
