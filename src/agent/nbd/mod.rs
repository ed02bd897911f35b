//! The NBD server through which guests read and write protected disks.
