//! The mixnet data path, in the order packets flow through it:
//! `ingress` (Noise links in, admitted to their handshake by `crate::admission`; framing) → `intake` (overload shedding, Sphinx workers running
//! `sphinx` with its `replay` filter) → `forward` (the `delay` queue) → `egress` (Noise links out).

pub mod commit;
pub mod delay;
pub mod egress;
pub mod epochs;
pub mod forward;
pub mod framing;
pub mod ingress;
pub mod intake;
pub mod noise;
pub mod replay;
pub mod sphinx;
pub mod tag_journal;
