//! Shape checks on a descriptor chain before a device trusts it.
//!
//! virtio-queue bounds the walk (a loop ends after queue-size steps, an
//! unreadable descriptor ends it) but ends it silently; we turn a chain that
//! ended early into an error, so a device never acts on half a request.
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use crate::memory::GuestMemory;

pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;
/// The dirty-bitmap slice guest-memory accesses carry (memory.rs).
pub type BitmapSlice<'a> = vm_memory::bitmap::RefSlice<'a, vm_memory::bitmap::AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain cut short (a loop, a next index out of range, or a table outside guest memory)")]
    Truncated,
    #[error("a device-readable descriptor follows a device-writable one")]
    Order,
    #[error("descriptor buffer outside guest memory: {0}")]
    Buffer(virtio_queue::Error),
}

/// The guest buffers of one well-formed chain: what the device reads, then
/// what it writes.
pub struct Buffers<'a> {
    pub head: u16,
    pub reader: Reader<'a, BitmapSlice<'a>>,
    pub writer: Writer<'a, BitmapSlice<'a>>,
    /// Whether the chain ends in a device-writable descriptor (where blk
    /// puts its status byte).
    pub ends_writable: bool,
}

pub fn buffers<'a>(chain: Chain<'a>, mem: &'a GuestMemory) -> Result<Buffers<'a>, ChainError> {
    let head = chain.head_index();
    let mut seen_writable = false;
    let mut last = None;
    for desc in chain.clone() {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err(ChainError::Order);
        }
        last = Some(desc);
    }
    let last = last.ok_or(ChainError::Empty)?;
    if last.has_next() {
        return Err(ChainError::Truncated);
    }
    let reader = Reader::new(mem, chain.clone()).map_err(ChainError::Buffer)?;
    let writer = Writer::new(mem, chain).map_err(ChainError::Buffer)?;
    Ok(Buffers { head, reader, writer, ends_writable: last.is_write_only() })
}

/// Returns a chain to the guest. A failure means the guest broke its own
/// used ring (or the head index); its request is lost, nothing else.
pub fn put_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("virtio: cannot return descriptor {head}: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::{memory, RawDesc, F_NEXT, F_WRITE};

    const INDIRECT: u16 = 4;

    /// Publishes `descs` (absolute next indices) as one chain at head 0 of
    /// a 16-entry queue and returns what `buffers` makes of it as
    /// (readable bytes, writable bytes, ends writable).
    fn shape(descs: &[RawDesc]) -> Result<(usize, usize, bool), ChainError> {
        let mem = memory();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        q.set_ready(true);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = GuestAddress(0x1000 + 16 * i as u64);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        let c = q.pop_descriptor_chain(&mem).unwrap();
        let b = buffers(c, &mem)?;
        Ok((b.reader.available_bytes(), b.writer.available_bytes(), b.ends_writable))
    }

    #[test]
    fn well_formed_chains_split_into_reader_and_writer() {
        let r = shape(&[(0x10000, 16, F_NEXT, 1), (0x11000, 512, F_NEXT | F_WRITE, 2), (0x12000, 1, F_WRITE, 0)]);
        assert_eq!(r.unwrap(), (16, 513, true));
        assert_eq!(shape(&[(0x10000, 16, 0, 0)]).unwrap(), (16, 0, false));
        // An indirect table of all zeroes is one empty readable descriptor.
        assert_eq!(shape(&[(0x8000, 32, INDIRECT, 0)]).unwrap(), (0, 0, false));
    }

    #[test]
    fn malformed_chains_are_classified() {
        assert!(matches!(shape(&[(0x10000, 16, F_NEXT, 1), (0x11000, 16, F_NEXT, 0)]), Err(ChainError::Truncated)));
        assert!(matches!(shape(&[(0x10000, 16, F_NEXT, 16)]), Err(ChainError::Truncated)));
        assert!(matches!(shape(&[(0x10000, 1, F_WRITE | F_NEXT, 1), (0x11000, 16, 0, 0)]), Err(ChainError::Order)));
        assert!(matches!(shape(&[(0xffff_0000_0000, 16, 0, 0)]), Err(ChainError::Buffer(_))));
        assert!(matches!(shape(&[(0x10000, 16, 0, 0), (0, 0, 0, 0)]).map(|s| s.0), Ok(16)));
        assert!(matches!(shape(&[(0xffff_0000_0000, 64, INDIRECT, 0)]), Err(ChainError::Empty)));
    }
}
