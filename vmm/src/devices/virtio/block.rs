//! virtio-blk backed by a host file (virtio 1.2 section 5.2).
//!
//! One request queue. Supported requests: IN, OUT, FLUSH and GET_ID; anything else
//! completes with `VIRTIO_BLK_S_UNSUPP`. Every request is validated before any I/O:
//! a 16-byte device-readable header first, then data descriptors whose direction matches
//! the request, then a device-writable status byte last; the data length must be a
//! multiple of 512 and the sector range must lie within the disk. Malformed requests
//! complete with `VIRTIO_BLK_S_IOERR` when there is a status byte to write, and with a
//! zero-length used entry otherwise.
//!
//! File I/O is positional (`pread`/`pwrite` through a bounce buffer), so nothing depends
//! on the file offset.
//!
//! The device runs on the VMM's event loop: it is a `MutEventSubscriber` whose `init`
//! registers an activation eventfd. Activation (from the vCPU thread, via the transport)
//! stores the queue and signals that eventfd; the event loop then registers the queue
//! notification eventfd and processes the queue whenever it fires.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    feature, VirtioDevice, VirtioError, VirtioInterrupt, INT_USED_RING, VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};

/// Sector size of the virtio-blk protocol (capacity and request sectors are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Maximum data segments per request (`seg_max`); a request uses `SEG_MAX + 2` descriptors.
pub const SEG_MAX: u32 = 128;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// `struct virtio_blk_outhdr`: type (u32), ioprio (u32), sector (u64).
const REQUEST_HEADER_LEN: u32 = 16;
/// Longest chain accepted (the queue already bounds direct chains to the queue size;
/// this also bounds indirect tables).
const MAX_CHAIN_LEN: usize = QUEUE_SIZE as usize;
/// Bounce buffer size for file <-> guest memory copies.
const BOUNCE_LEN: usize = 128 * 1024;
/// Bytes of `struct virtio_blk_config` we fill: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;

/// Errors of the block device: construction failures and (internally) failed requests.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot determine the disk size: {0}")]
    DiskSize(io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    #[error("the chain has no request header")]
    MissingHeader,
    #[error("the request header descriptor is device-writable")]
    HeaderWritable,
    #[error("the request header descriptor is {0} bytes, expected 16")]
    HeaderLength(u32),
    #[error("a data descriptor has the wrong direction for request type {0}")]
    DataDirection(u32),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("request for {len} bytes at sector {sector} is beyond the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("write request on a read-only disk")]
    ReadOnly,
    #[error("GET_ID buffer of {0} bytes is shorter than 20")]
    IdBufferTooSmall(u64),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
    #[error("disk I/O: {0}")]
    Io(#[from] io::Error),
}

impl BlockError {
    /// The status byte a failed request completes with.
    fn status(&self) -> u8 {
        match self {
            BlockError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A serial (GET_ID) derived from the file name of `path`, at most 20 bytes.
pub fn serial_from_path(path: &Path) -> Vec<u8> {
    let name = path.file_name().unwrap_or(path.as_os_str());
    let mut serial = name.as_encoded_bytes().to_vec();
    serial.truncate(SERIAL_LEN);
    serial
}

/// The backing file and request execution.
struct Disk {
    file: File,
    read_only: bool,
    /// Usable size in bytes (a multiple of 512).
    size: u64,
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
}

impl Disk {
    /// Handles one chain and returns the number of bytes written to guest memory.
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let mut descs = Vec::new();
        for desc in chain {
            if descs.len() == MAX_CHAIN_LEN {
                tracing::warn!("virtio-blk: descriptor chain longer than {MAX_CHAIN_LEN}; dropped");
                return 0;
            }
            descs.push(desc);
        }
        let Some((status, request)) = descs.split_last() else {
            tracing::warn!("virtio-blk: empty descriptor chain");
            return 0;
        };
        if !status.is_write_only()
            || status.len() == 0
            || !GuestMemoryBackend::check_range(mem, status.addr(), 1)
        {
            tracing::warn!("virtio-blk: request without a writable status byte; dropped");
            return 0;
        }
        let (code, written) = match self.execute(mem, request) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                tracing::debug!("virtio-blk: request failed: {e}");
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(code, status.addr()) {
            tracing::warn!("virtio-blk: cannot write the status byte: {e}");
            return 0;
        }
        written.saturating_add(1)
    }

    /// Executes a request (the chain without its status descriptor); returns the number of
    /// data bytes written to guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, BlockError> {
        let (header, data) = descs.split_first().ok_or(BlockError::MissingHeader)?;
        if header.is_write_only() {
            return Err(BlockError::HeaderWritable);
        }
        if header.len() != REQUEST_HEADER_LEN {
            return Err(BlockError::HeaderLength(header.len()));
        }
        let mut raw = [0u8; REQUEST_HEADER_LEN as usize];
        mem.read_slice(&mut raw, header.addr())?;
        let ty = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[8..16]);
        let sector = u64::from_le_bytes(sector);

        match ty {
            VIRTIO_BLK_T_IN => {
                let len = self.check_data(mem, ty, data, true, sector)?;
                self.read_to_guest(mem, data, sector * SECTOR_SIZE)?;
                Ok(u32::try_from(len).unwrap_or(u32::MAX))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                self.check_data(mem, ty, data, false, sector)?;
                self.write_from_guest(mem, data, sector * SECTOR_SIZE)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data()?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let len = check_buffers(mem, ty, data, true)?;
                if len < SERIAL_LEN as u64 {
                    return Err(BlockError::IdBufferTooSmall(len));
                }
                let mut rest = &self.serial[..];
                for d in data {
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest.len().min(d.len() as usize);
                    mem.write_slice(&rest[..n], d.addr())?;
                    rest = &rest[n..];
                }
                Ok(SERIAL_LEN as u32)
            }
            other => Err(BlockError::Unsupported(other)),
        }
    }

    /// Validates the data descriptors of an IN/OUT request and its sector range; returns
    /// the data length.
    fn check_data(
        &self,
        mem: &GuestMemoryMmap,
        ty: u32,
        data: &[Descriptor],
        device_writes: bool,
        sector: u64,
    ) -> Result<u64, BlockError> {
        let len = check_buffers(mem, ty, data, device_writes)?;
        if len % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedLength(len));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len))
            .filter(|&end| end <= self.size)
            .ok_or(BlockError::OutOfRange { sector, len })?;
        Ok(len)
    }

    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        mut pos: u64,
    ) -> Result<(), BlockError> {
        for d in data {
            let len = u64::from(d.len());
            let mut done = 0;
            while done < len {
                let n = (len - done).min(BOUNCE_LEN as u64) as usize;
                let buf = &mut self.bounce[..n];
                self.file.read_exact_at(buf, pos)?;
                mem.write_slice(buf, buffer_addr(d, done)?)?;
                done += n as u64;
                pos += n as u64;
            }
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        mut pos: u64,
    ) -> Result<(), BlockError> {
        for d in data {
            let len = u64::from(d.len());
            let mut done = 0;
            while done < len {
                let n = (len - done).min(BOUNCE_LEN as u64) as usize;
                let buf = &mut self.bounce[..n];
                mem.read_slice(buf, buffer_addr(d, done)?)?;
                self.file.write_all_at(buf, pos)?;
                done += n as u64;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

fn buffer_addr(d: &Descriptor, offset: u64) -> Result<GuestAddress, BlockError> {
    d.addr().checked_add(offset).ok_or(BlockError::BadBuffer {
        addr: d.addr().raw_value(),
        len: d.len(),
    })
}

/// Checks the direction and guest-memory placement of data descriptors; returns their
/// total length.
fn check_buffers(
    mem: &GuestMemoryMmap,
    ty: u32,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<u64, BlockError> {
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(BlockError::DataDirection(ty));
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(BlockError::BadBuffer {
                addr: d.addr().raw_value(),
                len: d.len(),
            });
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue: Queue,
}

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 1],
    /// Written on activation; wakes the event loop to (re)register the queue eventfd.
    activate_evt: EventFd,
    /// Queue eventfds handed over by the latest activation, not yet registered.
    pending_evts: Option<Vec<EventFd>>,
    /// Queue eventfds registered with the event loop (kept open until unregistered).
    registered_evts: Vec<EventFd>,
    active: Option<Active>,
}

impl Block {
    /// A block device for `file`. With `read_only` the device advertises VIRTIO_BLK_F_RO and
    /// fails writes; otherwise `file` must be open for writing. `serial` (GET_ID) is cut
    /// to 20 bytes. The capacity is the file size rounded down to 512 bytes.
    pub fn new(file: File, read_only: bool, serial: &[u8]) -> Result<Self, BlockError> {
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(BlockError::DiskSize)?;
        if len % SECTOR_SIZE != 0 {
            tracing::warn!(
                "virtio-blk: disk size {len} is not a multiple of 512; the last {} bytes are unused",
                len % SECTOR_SIZE
            );
        }
        let sectors = len / SECTOR_SIZE;

        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE);
        if read_only {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        // size_max (8..12) and geometry (16..20) are not offered.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        let mut id = [0u8; SERIAL_LEN];
        let n = serial.len().min(SERIAL_LEN);
        id[..n].copy_from_slice(&serial[..n]);

        Ok(Self {
            disk: Disk {
                file,
                read_only,
                size: sectors * SECTOR_SIZE,
                serial: id,
                bounce: vec![0; BOUNCE_LEN],
            },
            avail_features,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            pending_evts: None,
            registered_evts: Vec::new(),
            active: None,
        })
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    /// Whether the driver has activated the device (DRIVER_OK, no reset since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Processes every available request, then interrupts the guest if the queue asks for
    /// it. The event loop calls this when the queue eventfd fires; a no-op while inactive.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queue;
        let mut used = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!("virtio-blk: cannot disable queue notifications: {e}");
                break;
            }
            let mut progressed = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                progressed = true;
                let head = chain.head_index();
                let len = self.disk.handle_chain(mem, chain);
                if let Err(e) = queue.add_used(mem, head, len) {
                    tracing::warn!("virtio-blk: cannot complete descriptor {head}: {e}");
                }
                used = true;
            }
            match queue.enable_notification(mem) {
                // More requests arrived meanwhile. (A broken available ring also reports
                // "more" without yielding chains; `progressed` stops that loop.)
                Ok(true) if progressed => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!("virtio-blk: cannot enable queue notifications: {e}");
                    break;
                }
            }
        }
        if !used {
            return;
        }
        let notify = queue.needs_notification(mem).unwrap_or_else(|e| {
            tracing::warn!("virtio-blk: cannot read used_event: {e}");
            true
        });
        if notify {
            if let Err(e) = active.interrupt.trigger(INT_USED_RING) {
                tracing::warn!("virtio-blk: cannot raise the interrupt: {e}");
            }
        }
    }

    /// Swaps the registered queue eventfds for the ones of the latest activation.
    fn register_queue_evts(&mut self, ops: &mut EventOps) {
        let Some(new) = self.pending_evts.take() else {
            return;
        };
        for old in self.registered_evts.drain(..) {
            if let Err(e) = ops.remove(Events::new(&old, EventSet::IN)) {
                tracing::warn!("virtio-blk: cannot unregister a queue eventfd: {e:?}");
            }
        }
        for evt in &new {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-blk: cannot register the queue eventfd: {e:?}");
            }
        }
        self.registered_evts = new;
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE.
        tracing::warn!(
            "virtio-blk: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        _acked_features: u64,
    ) -> Result<(), VirtioError> {
        if self.active.is_some() {
            return Err(VirtioError::AlreadyActive);
        }
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: queues.len().min(queue_evts.len()),
            });
        }
        let Some(queue) = queues.into_iter().next() else {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        if !queue.ready() {
            return Err(VirtioError::QueueNotReady(0));
        }
        if !queue.is_valid(&mem) {
            return Err(VirtioError::QueueInvalid(0));
        }
        self.activate_evt
            .write(1)
            .map_err(VirtioError::ActivateEvent)?;
        self.pending_evts = Some(queue_evts);
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        Ok(())
    }

    fn active_queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn reset(&mut self) {
        // Registered eventfds stay registered (and open) so the event loop never sees a
        // closed fd; notifications on them are drained and ignored while inactive.
        self.active = None;
        self.pending_evts = None;
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            tracing::error!("virtio-blk: cannot register the activation eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.register_queue_evts(ops);
            // Requests queued before the eventfd was registered.
            self.process_queue();
        } else if let Some(evt) = self.registered_evts.iter().find(|e| e.as_raw_fd() == fd) {
            let _ = evt.read();
            self.process_queue();
        } else {
            tracing::warn!("virtio-blk: event on unexpected fd {fd}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::*;
    use crate::devices::virtio::{status, INT_CONFIG_CHANGE};

    const MEM_SIZE: usize = 0x40_0000;
    const DESC_TABLE: u64 = 0x1000;
    const AVAIL_RING: u64 = 0x3000;
    const USED_RING: u64 = 0x4000;
    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0xf_0000;
    const DISK_SECTORS: u64 = 1024;
    const QSIZE: u16 = 16;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const DRIVER_OK_ALL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    struct Harness {
        mem: GuestMemoryMmap,
        transport: MmioTransport,
        block: Arc<Mutex<Block>>,
        em: EventManager<Arc<Mutex<Block>>>,
        file: TempFile,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Harness {
        /// A device on a 64-sector disk, initialized by the "driver" with `features`.
        fn new(read_only: bool, features: u64) -> Self {
            let mut h = Self::uninit(read_only);
            h.driver_init(features, true);
            h
        }

        fn uninit(read_only: bool) -> Self {
            let file = TempFile::new().unwrap();
            file.as_file()
                .write_all(&pattern((DISK_SECTORS * SECTOR_SIZE) as usize))
                .unwrap();
            let disk = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(file.as_path())
                .unwrap();
            let block = Arc::new(Mutex::new(
                Block::new(disk, read_only, b"disk-serial-0123456789").unwrap(),
            ));
            let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
            em.add_subscriber(block.clone());
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
            Self {
                mem,
                transport,
                block,
                em,
                file,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        fn rd(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.transport.read(off, &mut b);
            u32::from_le_bytes(b)
        }

        fn wr(&mut self, off: u64, v: u32) {
            self.transport.write(off, &v.to_le_bytes());
        }

        fn device_features(&mut self) -> u64 {
            self.wr(REG_DEVICE_FEATURES_SEL, 0);
            let lo = self.rd(REG_DEVICE_FEATURES);
            self.wr(REG_DEVICE_FEATURES_SEL, 1);
            let hi = self.rd(REG_DEVICE_FEATURES);
            u64::from(hi) << 32 | u64::from(lo)
        }

        /// The Linux virtio-mmio probe sequence.
        fn driver_init(&mut self, features: u64, queue_ready: bool) {
            self.wr(REG_STATUS, 0);
            self.wr(REG_STATUS, status::ACKNOWLEDGE);
            self.wr(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
            let offered = self.device_features();
            assert_eq!(features & !offered, 0, "test asks for unoffered features");
            self.wr(REG_DRIVER_FEATURES_SEL, 0);
            self.wr(REG_DRIVER_FEATURES, features as u32);
            self.wr(REG_DRIVER_FEATURES_SEL, 1);
            self.wr(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.wr(
                REG_STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
            assert_ne!(self.rd(REG_STATUS) & status::FEATURES_OK, 0);
            self.wr(REG_QUEUE_SEL, 0);
            assert_eq!(self.rd(REG_QUEUE_READY), 0);
            assert_eq!(self.rd(REG_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            self.wr(REG_QUEUE_NUM, u32::from(QSIZE));
            self.wr(REG_QUEUE_DESC_LOW, DESC_TABLE as u32);
            self.wr(REG_QUEUE_DESC_HIGH, 0);
            self.wr(REG_QUEUE_DRIVER_LOW, AVAIL_RING as u32);
            self.wr(REG_QUEUE_DRIVER_HIGH, 0);
            self.wr(REG_QUEUE_DEVICE_LOW, USED_RING as u32);
            self.wr(REG_QUEUE_DEVICE_HIGH, 0);
            if queue_ready {
                self.wr(REG_QUEUE_READY, 1);
            }
            // Fresh rings.
            self.mem
                .write_slice(&[0u8; 0x2000], GuestAddress(AVAIL_RING))
                .unwrap();
            self.next_desc = 0;
            self.avail_idx = 0;
            self.wr(REG_STATUS, DRIVER_OK_ALL);
            self.run_loop();
        }

        /// Runs the event loop until nothing is pending.
        fn run_loop(&mut self) {
            for _ in 0..16 {
                if self.em.run_with_timeout(0).unwrap() == 0 {
                    return;
                }
            }
            panic!("event loop does not settle");
        }

        /// Writes a chain of `(addr, len, flags)` descriptors and makes it available.
        fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % QSIZE;
                let last = i + 1 == descs.len();
                let flags = flags | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                let next = (idx + 1) % QSIZE;
                self.write_desc(idx, addr, len, flags, next);
            }
            self.next_desc = (head + descs.len() as u16) % QSIZE;
            self.make_available(head);
            head
        }

        fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = DESC_TABLE + u64::from(idx) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }

        fn make_available(&mut self, head: u16) {
            let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
                .unwrap();
        }

        /// QueueNotify through the bus (no ioeventfd), then let the event loop run.
        fn notify(&mut self) {
            self.wr(REG_QUEUE_NOTIFY, 0);
            self.run_loop();
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
        }

        fn used_elem(&self, i: u16) -> (u32, u32) {
            let at = USED_RING + 4 + 8 * u64::from(i % QSIZE);
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        fn write_header(&self, ty: u32, sector: u64) {
            self.mem.write_obj(ty, GuestAddress(HEADER)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
            self.mem
                .write_obj(sector, GuestAddress(HEADER + 8))
                .unwrap();
        }

        /// Submits `chain`, notifies and returns (status byte, used length).
        fn run_chain(&mut self, chain: &[(u64, u32, u16)]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let before = self.used_idx();
            let head = self.submit(chain);
            self.notify();
            assert_eq!(
                self.used_idx(),
                before.wrapping_add(1),
                "request not completed"
            );
            let (id, len) = self.used_elem(before);
            assert_eq!(id, u32::from(head));
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        /// A well-formed request: header, `data`, status.
        fn request(&mut self, ty: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
            self.write_header(ty, sector);
            let mut chain = vec![(HEADER, 16, R)];
            chain.extend_from_slice(data);
            chain.push((STATUS, 1, W));
            self.run_chain(&chain)
        }

        fn file_bytes(&self) -> Vec<u8> {
            std::fs::read(self.file.as_path()).unwrap()
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        /// Reads and clears the irq eventfd; true if the interrupt was raised.
        fn irq_fired(&self) -> bool {
            self.transport.interrupt().irq_evt().read().is_ok()
        }
    }

    /// Compares byte buffers, reporting the first difference instead of both buffers.
    #[track_caller]
    fn assert_same(a: &[u8], b: &[u8]) {
        assert_eq!(a.len(), b.len(), "lengths differ");
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            panic!("buffers differ at byte {i}: {:#x} != {:#x}", a[i], b[i]);
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn virtio_blk_identity_features_and_config() {
        let mut h = Harness::uninit(false);
        assert_eq!(h.rd(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(h.rd(REG_VERSION), 2);
        assert_eq!(h.rd(REG_DEVICE_ID), VIRTIO_ID_BLOCK);
        let f = h.device_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature {bit} missing");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        // capacity (as one 8-byte and as two 4-byte reads), seg_max, blk_size.
        let mut b8 = [0u8; 8];
        h.transport.read(CONFIG_SPACE_OFFSET, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), DISK_SECTORS);
        assert_eq!(h.rd(CONFIG_SPACE_OFFSET), DISK_SECTORS as u32);
        assert_eq!(h.rd(CONFIG_SPACE_OFFSET + 4), 0);
        assert_eq!(h.rd(CONFIG_SPACE_OFFSET + 12), SEG_MAX);
        assert_eq!(h.rd(CONFIG_SPACE_OFFSET + 20), 512);
        let mut b2 = [0u8; 2];
        h.transport.read(CONFIG_SPACE_OFFSET + 20, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 512);
        // Past the fields we fill, and past the slot: zeros; config writes are ignored.
        assert_eq!(h.rd(CONFIG_SPACE_OFFSET + 24), 0);
        assert_eq!(h.rd(0xffc), 0);
        h.wr(CONFIG_SPACE_OFFSET, 0x1234);
        assert_eq!(h.rd(CONFIG_SPACE_OFFSET), DISK_SECTORS as u32);
        assert_eq!(h.block.lock().unwrap().capacity(), DISK_SECTORS);
    }

    #[test]
    fn virtio_blk_capacity_rounds_down_odd_sizes() {
        let file = TempFile::new().unwrap();
        file.as_file().write_all(&[1u8; 1000]).unwrap();
        let blk = Block::new(file.into_file(), true, b"x").unwrap();
        assert_eq!(blk.capacity(), 1);
    }

    #[test]
    fn virtio_blk_read_returns_file_bytes() {
        let mut h = Harness::new(false, V1);
        assert!(h.block.lock().unwrap().is_active());
        // Sectors 3..6 into two buffers of different sizes.
        let (st, len) = h.request(
            VIRTIO_BLK_T_IN,
            3,
            &[(DATA, 512, W), (DATA + 0x1000, 1024, W)],
        );
        assert_eq!(st, OK);
        assert_eq!(len, 1536 + 1);
        let disk = h.file_bytes();
        assert_same(&h.guest_bytes(DATA, 512), &disk[3 * 512..4 * 512]);
        assert_same(&h.guest_bytes(DATA + 0x1000, 1024), &disk[4 * 512..6 * 512]);
        // A read larger than the bounce buffer.
        let big = 2 * BOUNCE_LEN as u32 + 4096;
        let (st, _) = h.request(VIRTIO_BLK_T_IN, 1, &[(0x10_0000, big, W)]);
        assert_eq!(st, OK);
        assert_same(
            &h.guest_bytes(0x10_0000, big as usize),
            &disk[512..512 + big as usize],
        );
        // The used-buffer interrupt was raised; InterruptACK clears it.
        assert!(h.irq_fired());
        assert_eq!(h.rd(REG_INTERRUPT_STATUS), INT_USED_RING);
        h.wr(REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(h.rd(REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn virtio_blk_write_changes_file() {
        let mut h = Harness::new(false, V1);
        let before = h.file_bytes();
        h.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        h.mem
            .write_slice(&[0xa5; 512], GuestAddress(DATA + 0x800))
            .unwrap();
        let (st, len) = h.request(
            VIRTIO_BLK_T_OUT,
            10,
            &[(DATA, 512, R), (DATA + 0x800, 512, R)],
        );
        assert_eq!(st, OK);
        assert_eq!(len, 1);
        let after = h.file_bytes();
        assert_eq!(after.len(), before.len());
        assert_eq!(after[10 * 512..11 * 512], [0x5a; 512]);
        assert_eq!(after[11 * 512..12 * 512], [0xa5; 512]);
        assert_eq!(after[..10 * 512], before[..10 * 512]);
        assert_eq!(after[12 * 512..], before[12 * 512..]);
        // The last sector is writable too.
        let (st, _) = h.request(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, &[(DATA, 512, R)]);
        assert_eq!(st, OK);
        assert_same(
            &h.file_bytes()[(DISK_SECTORS as usize - 1) * 512..],
            &[0x5a; 512],
        );
    }

    #[test]
    fn virtio_blk_flush_and_get_id() {
        let mut h = Harness::new(false, V1);
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
        let (st, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
        assert_eq!(st, OK);
        assert_eq!(len, 21);
        assert_eq!(h.guest_bytes(DATA, 20), b"disk-serial-01234567");
        // Split over two buffers.
        h.mem.write_slice(&[0u8; 32], GuestAddress(DATA)).unwrap();
        let (st, _) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 5, W), (DATA + 16, 15, W)]);
        assert_eq!(st, OK);
        assert_eq!(h.guest_bytes(DATA, 5), b"disk-");
        assert_eq!(h.guest_bytes(DATA + 16, 15), b"serial-01234567");
        // Too small a buffer, or a device-readable one.
        assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 19, W)]).0, IOERR);
        assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, R)]).0, IOERR);
        // Short serials are zero-padded.
        assert_eq!(
            serial_from_path(Path::new("/var/lib/images/root.img")),
            b"root.img"
        );
        assert_eq!(
            serial_from_path(Path::new("a-very-long-disk-image-name.raw")).len(),
            20
        );
    }

    #[test]
    fn virtio_blk_out_of_range_is_ioerr() {
        let mut h = Harness::new(false, V1);
        let before = h.file_bytes();
        h.mem
            .write_slice(&[0x77; 1024], GuestAddress(DATA))
            .unwrap();
        for (ty, sector, len) in [
            (VIRTIO_BLK_T_IN, DISK_SECTORS, 512),
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024),
            (VIRTIO_BLK_T_IN, u64::MAX / 512, 512),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_OUT, DISK_SECTORS, 512),
            (VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, 1024),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
        ] {
            let flags = if ty == VIRTIO_BLK_T_IN { W } else { R };
            let (st, len) = h.request(ty, sector, &[(DATA, len, flags)]);
            assert_eq!(st, IOERR, "type {ty} sector {sector}");
            assert_eq!(len, 1);
        }
        // Nothing was written and the file did not grow.
        assert_same(&h.file_bytes(), &before);
        // The last sector is fine.
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[(DATA, 512, W)])
                .0,
            OK
        );
    }

    #[test]
    fn virtio_blk_malformed_requests_fail_cleanly() {
        let mut h = Harness::new(false, V1);
        let before = h.file_bytes();
        h.write_header(VIRTIO_BLK_T_IN, 0);

        // Unaligned data length.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, W)]).0, IOERR);
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 513, R)]).0, IOERR);
        // Data descriptors in the wrong direction.
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, R)]).0, IOERR);
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]).0, IOERR);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W), (DATA + 512, 512, R)])
                .0,
            IOERR
        );
        // Buffers outside guest memory, or wrapping the address space.
        let end = MEM_SIZE as u64;
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, &[(end - 256, 512, W)]).0,
            IOERR
        );
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &[(end, 512, R)]).0, IOERR);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, W)]).0,
            IOERR
        );
        // Unsupported request types.
        assert_eq!(h.request(11, 0, &[(DATA, 16, R)]).0, UNSUPP);
        assert_eq!(h.request(0xdead_beef, 0, &[]).0, UNSUPP);

        // Header too short, too long, device-writable, or missing (status only).
        h.write_header(VIRTIO_BLK_T_IN, 0);
        let data = (DATA, 512, W);
        let status = (STATUS, 1, W);
        assert_eq!(h.run_chain(&[(HEADER, 8, R), data, status]), (IOERR, 1));
        assert_eq!(h.run_chain(&[(HEADER, 24, R), data, status]), (IOERR, 1));
        assert_eq!(h.run_chain(&[(HEADER, 16, W), data, status]), (IOERR, 1));
        assert_eq!(h.run_chain(&[status]), (IOERR, 1));
        // Header outside guest memory.
        assert_eq!(
            h.run_chain(&[(MEM_SIZE as u64, 16, R), data, status]),
            (IOERR, 1)
        );

        // No status descriptor: the last one is device-readable, or zero-length, or the
        // status byte is outside guest memory. The chain is completed with length 0 and
        // nothing is written.
        h.write_header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(h.run_chain(&[(HEADER, 16, R), (DATA, 512, R)]), (0xff, 0));
        assert_eq!(h.run_chain(&[(HEADER, 16, R)]), (0xff, 0));
        assert_eq!(
            h.run_chain(&[(HEADER, 16, R), (DATA, 512, R), (STATUS, 0, W)]),
            (0xff, 0)
        );
        assert_eq!(
            h.run_chain(&[(HEADER, 16, R), (DATA, 512, R), (MEM_SIZE as u64, 1, W)]),
            (0xff, 0)
        );
        assert_same(&h.file_bytes(), &before);

        // A descriptor loop: the chain ends after QSIZE descriptors, no hang.
        let head = h.next_desc;
        h.write_desc(head, HEADER, 16, VRING_DESC_F_NEXT as u16, head);
        h.next_desc = (head + 1) % QSIZE;
        let used = h.used_idx();
        h.make_available(head);
        h.notify();
        assert_eq!(h.used_idx(), used.wrapping_add(1));
        // A head index beyond the queue size is skipped without panicking.
        h.make_available(QSIZE + 3);
        h.notify();

        // After a reset the device works again.
        h.driver_init(V1, true);
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 2, &[(DATA, 512, W)]).0, OK);
        assert_same(&h.guest_bytes(DATA, 512), &before[1024..1536]);
    }

    #[test]
    fn virtio_blk_read_only_rejects_writes() {
        let mut h = Harness::new(true, V1 | 1 << VIRTIO_BLK_F_RO);
        assert_ne!(h.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let before = h.file_bytes();
        h.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
            (IOERR, 1)
        );
        assert_same(&h.file_bytes(), &before);
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        assert_same(&h.guest_bytes(DATA, 512), &before[..512]);
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    }

    #[test]
    fn virtio_blk_many_requests_wrap_the_ring() {
        let mut h = Harness::new(false, V1);
        let disk = h.file_bytes();
        // Three chains with a single notification.
        for i in 0..3u64 {
            h.write_header(VIRTIO_BLK_T_IN, i);
            // Each request needs its own header; place them apart.
            let hdr = HEADER + 0x100 * (i + 1);
            h.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
            h.mem.write_obj(i, GuestAddress(hdr + 8)).unwrap();
            h.submit(&[
                (hdr, 16, R),
                (DATA + 0x1000 * i, 512, W),
                (STATUS + i, 1, W),
            ]);
        }
        h.notify();
        assert_eq!(h.used_idx(), 3);
        for i in 0..3u64 {
            assert_eq!(h.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), OK);
            let at = (i * 512) as usize;
            assert_same(&h.guest_bytes(DATA + 0x1000 * i, 512), &disk[at..at + 512]);
        }
        // Forty more, one at a time: the ring indices wrap past the queue size.
        for i in 0..40u64 {
            let sector = i % DISK_SECTORS;
            let (st, _) = h.request(VIRTIO_BLK_T_IN, sector, &[(DATA, 512, W)]);
            assert_eq!(st, OK);
            let at = (sector * 512) as usize;
            assert_same(&h.guest_bytes(DATA, 512), &disk[at..at + 512]);
        }
        assert_eq!(h.used_idx(), 43);
    }

    #[test]
    fn virtio_blk_event_idx_suppresses_interrupts() {
        let mut h = Harness::new(false, V1 | 1 << VIRTIO_RING_F_EVENT_IDX);
        let used_event = GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QSIZE));
        let avail_event = GuestAddress(USED_RING + 4 + 8 * u64::from(QSIZE));
        // The driver wants an interrupt only after the second completion.
        h.mem.write_obj(1u16, used_event).unwrap();
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        assert!(!h.irq_fired());
        assert_eq!(h.rd(REG_INTERRUPT_STATUS), 0);
        // The device asks to be notified for the next request.
        assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 1);
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        assert!(h.irq_fired());
        assert_eq!(h.rd(REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 2);
    }

    #[test]
    fn virtio_blk_reset_and_reactivation() {
        let mut h = Harness::new(false, V1);
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        assert!(h.irq_fired());

        h.wr(REG_STATUS, 0);
        assert_eq!(h.rd(REG_STATUS), 0);
        assert_eq!(h.rd(REG_INTERRUPT_STATUS), 0);
        assert_eq!(h.rd(REG_QUEUE_READY), 0);
        assert!(!h.block.lock().unwrap().is_active());
        // Requests submitted to a reset device are not processed; the notification is
        // drained (the loop settles).
        h.write_header(VIRTIO_BLK_T_IN, 0);
        h.submit(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        h.notify();
        assert_eq!(h.used_idx(), 1);
        assert!(!h.irq_fired());

        // The driver brings the device up again with fresh rings; the eventfds handed over
        // on re-activation replace the old registrations.
        h.driver_init(V1, true);
        assert!(h.block.lock().unwrap().is_active());
        let disk = h.file_bytes();
        assert_eq!(h.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 512, W)]).0, OK);
        assert_same(&h.guest_bytes(DATA, 512), &disk[7 * 512..8 * 512]);
        assert!(h.irq_fired());
        // The same through the ioeventfd path: the eventfd the VMM would register.
        h.write_header(VIRTIO_BLK_T_IN, 8);
        h.submit(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        h.transport.queue_evts()[0].write(1).unwrap();
        h.run_loop();
        assert_eq!(h.used_idx(), 2);
        assert_same(&h.guest_bytes(DATA, 512), &disk[8 * 512..9 * 512]);
    }

    #[test]
    fn virtio_blk_requests_before_registration_are_not_lost() {
        // The subscriber is added before activation, the notification arrives before the
        // event loop has handled the activation.
        let mut h = Harness::uninit(false);
        h.wr(REG_STATUS, status::ACKNOWLEDGE);
        h.wr(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        h.wr(REG_DRIVER_FEATURES_SEL, 1);
        h.wr(REG_DRIVER_FEATURES, 1);
        h.wr(
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        h.wr(REG_QUEUE_NUM, u32::from(QSIZE));
        h.wr(REG_QUEUE_DESC_LOW, DESC_TABLE as u32);
        h.wr(REG_QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        h.wr(REG_QUEUE_DEVICE_LOW, USED_RING as u32);
        h.wr(REG_QUEUE_READY, 1);
        h.wr(REG_STATUS, DRIVER_OK_ALL);
        h.write_header(VIRTIO_BLK_T_GET_ID, 0);
        h.submit(&[(HEADER, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        h.wr(REG_QUEUE_NOTIFY, 0);
        h.run_loop();
        assert_eq!(h.used_idx(), 1);
        assert_eq!(h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    }

    #[test]
    fn virtio_blk_activation_needs_a_ready_valid_queue() {
        let mut h = Harness::uninit(false);
        h.driver_init(V1, false);
        assert_ne!(h.rd(REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(h.rd(REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(!h.block.lock().unwrap().is_active());

        // Rings outside guest memory.
        h.wr(REG_STATUS, 0);
        h.wr(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        h.wr(REG_DRIVER_FEATURES_SEL, 1);
        h.wr(REG_DRIVER_FEATURES, 1);
        h.wr(
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        h.wr(REG_QUEUE_NUM, u32::from(QSIZE));
        h.wr(REG_QUEUE_DESC_LOW, DESC_TABLE as u32);
        h.wr(REG_QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        h.wr(REG_QUEUE_DEVICE_LOW, 0);
        h.wr(REG_QUEUE_DEVICE_HIGH, 1);
        h.wr(REG_QUEUE_READY, 1);
        h.wr(REG_STATUS, DRIVER_OK_ALL);
        assert_ne!(h.rd(REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!h.block.lock().unwrap().is_active());

        // And a proper initialization still works afterwards.
        h.driver_init(V1, true);
        assert_eq!(h.rd(REG_STATUS), DRIVER_OK_ALL);
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    }

    #[test]
    fn virtio_blk_broken_available_ring_does_not_hang() {
        let mut h = Harness::new(false, V1);
        // The driver claims 100 new entries in a 16-entry ring.
        h.mem
            .write_obj(100u16, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        h.notify();
        assert_eq!(h.used_idx(), 0);
        assert!(!h.irq_fired());
    }
}
