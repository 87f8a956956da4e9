//! kube-nsg: Azure-style network security groups for Kubernetes.
//!
//! The pure core (`model`, `resolve`, `eval`, `effective`, `netpol`, `analyze`, `nft`) holds
//! the semantics; the shells around it (`api`, `cli`, `import`) talk to Kubernetes and files.

pub mod agent;
pub mod analyze;
pub mod api;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod effective;
pub mod eval;
pub mod import;
pub mod model;
pub mod netpol;
pub mod nft;
pub mod resolve;

/// The `kube-nsg` binary's global allocator (why: `main.rs`), named once so the benchmarks
/// that declare it too measure what the binary runs.
pub use tikv_jemallocator::Jemalloc as Allocator;

/// The length of a value's compact JSON text: what it takes of an object the API server
/// stores.
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, v).expect("serializable to JSON");
    count.0
}
