//! kiln-cache-server: RocksDB index, content store and HTTP service.
