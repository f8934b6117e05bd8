//! RocksDB options of the index: one column family per record kind (see
//! [`super::codec`]), tuned for point lookups on a small machine.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteOptions,
};

use super::{StoreConfig, StoreError};

pub(super) const CF_ENTRIES: &str = "entries";
pub(super) const CF_LRU: &str = "lru";
pub(super) const CF_BLOBS: &str = "blobs";

pub(super) fn db_err(e: rocksdb::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("No space left") || text.contains("Disk quota exceeded") {
        StoreError::NoSpace { context: text }
    } else {
        StoreError::Db(e)
    }
}

pub(super) fn durable() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

pub(super) fn open_db(path: &Path, config: &StoreConfig) -> Result<DB, StoreError> {
    // One LRU block cache for all column families: entries are read on
    // every lookup and should stay in memory; the budget is explicit so the
    // server's memory use is predictable.
    let cache = Cache::new_lru_cache(config.block_cache_bytes);

    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    // Background flushes and compactions: the machine is small, two jobs
    // keep compaction from blocking writes without starving requests.
    db_opts.increase_parallelism(2);
    db_opts.set_max_background_jobs(2);
    // Bound the WAL so recovery after a crash replays little, and keep few
    // info logs around on a cache volume.
    db_opts.set_max_total_wal_size(32 << 20);
    db_opts.set_keep_log_file_num(3);
    db_opts.set_bytes_per_sync(1 << 20);

    // Point lookups by key dominate: a full-key bloom filter (10 bits/key,
    // ~1% false positives) lets a miss skip reading data blocks, and
    // caching index and filter blocks (pinned for L0) keeps them in RAM.
    let point_table = || {
        let mut t = BlockBasedOptions::default();
        t.set_block_cache(&cache);
        t.set_bloom_filter(10.0, false);
        t.set_cache_index_and_filter_blocks(true);
        t.set_pin_l0_filter_and_index_blocks_in_cache(true);
        t.set_format_version(5);
        t
    };
    let mut entries = Options::default();
    entries.set_block_based_table_factory(&point_table());
    // Entries are small JSON documents: LZ4 is cheap and halves them.
    entries.set_compression_type(DBCompressionType::Lz4);
    entries.set_level_compaction_dynamic_level_bytes(true);
    // Small memtables: the index is tiny next to the blobs, and a small
    // write buffer keeps the WAL preallocation small on small volumes.
    entries.set_write_buffer_size(8 << 20);

    let mut blobs = Options::default();
    blobs.set_block_based_table_factory(&point_table());
    blobs.set_write_buffer_size(4 << 20);
    blobs.set_level_compaction_dynamic_level_bytes(true);

    // The LRU order is only ever scanned from the oldest end, never probed
    // by key, so a bloom filter would be memory spent for nothing.
    let mut lru_table = BlockBasedOptions::default();
    lru_table.set_block_cache(&cache);
    let mut lru = Options::default();
    lru.set_block_based_table_factory(&lru_table);
    lru.set_write_buffer_size(4 << 20);
    lru.set_level_compaction_dynamic_level_bytes(true);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_ENTRIES, entries),
        ColumnFamilyDescriptor::new(CF_LRU, lru),
        ColumnFamilyDescriptor::new(CF_BLOBS, blobs),
    ];
    DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
        let text = e.to_string();
        if text.contains("lock") && (text.contains("unavailable") || text.contains("held")) {
            StoreError::Locked(path.to_owned())
        } else {
            db_err(e)
        }
    })
}
