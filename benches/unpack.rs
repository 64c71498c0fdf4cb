//! Micro-benchmark of the hot path: decompress, hash and apply one layer held
//! in memory, against peers run in the same process on the same bytes:
//!
//! - `inflate+sha256`: decompressing and hashing only (the floor for any
//!   verifying unpacker);
//! - `tar-crate unpack`: flate2 plus the tar crate's own `Archive::unpack`,
//!   which verifies nothing and follows none of hydrafy's containment rules;
//! - `hydrafy unpack`: the real pipeline (decoder thread, applier thread,
//!   diff_id check, chroot-like resolution, deferred directory metadata).
//!
//! Files go to /dev/shm when it exists, so the figures are CPU and syscall
//! cost, not the disk. Run with `cargo bench --bench unpack`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hydrafy::oci::{Compression, Descriptor};
use hydrafy::oci::{Digest, HashingReader};
use hydrafy::ui::Recorder;
use hydrafy::unpack::{Applier, ApplyOptions};
use hydrafy::unpack::{LayerInput, unpack};

/// A Nix-like layer: one store path of `files` files with text-like content.
fn layer(files: usize) -> (Vec<u8>, Digest) {
    layer_named(files, "0000000000000000000000000000000a-bench")
}

/// [`layer`] with the store path `name`.
fn layer_named(files: usize, name: &str) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    let add_dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o555);
        h.set_mtime(1);
        h.set_size(0);
        tar.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    add_dir(&mut tar, "nix");
    add_dir(&mut tar, "nix/store");
    add_dir(&mut tar, &format!("nix/store/{name}"));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..files {
        if i % 50 == 0 {
            add_dir(&mut tar, &format!("nix/store/{name}/d{}", i / 50));
        }
        let len = 1024 + (i * 7919) % 60_000;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let word =
                ["lib", "nix", "store", "cuda", "0x1f", "\n", "fn ", "return"][(seed % 8) as usize];
            data.extend_from_slice(word.as_bytes());
        }
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o444);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        let path = format!("nix/store/{name}/d{}/f{i}", i / 50);
        tar.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = Digest::of(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), diff_id)
}

fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    base.join(format!("hydrafy-bench-{}", std::process::id()))
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = hydrafy::unpack::remove_tree(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}

fn bench(c: &mut Criterion) {
    let (blob, diff_id) = layer(4000);
    let raw_len = {
        let mut n = 0u64;
        let mut d = flate2::read::MultiGzDecoder::new(blob.as_slice());
        let mut buf = vec![0; 1 << 16];
        loop {
            let k = d.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    };
    let dir = scratch();
    let mut group = c.benchmark_group("one layer");
    group.throughput(Throughput::Bytes(raw_len));
    group.sample_size(20);

    group.bench_function("inflate+sha256", |b| {
        b.iter(|| {
            let mut r = HashingReader::new(flate2::read::MultiGzDecoder::new(blob.as_slice()));
            r.drain().unwrap();
            assert_eq!(r.finish().0, diff_id);
        })
    });

    group.bench_function("tar-crate unpack", |b| {
        b.iter_batched(
            || fresh(&dir.join("tar")),
            |root| {
                tar::Archive::new(flate2::read::MultiGzDecoder::new(blob.as_slice()))
                    .unpack(&root)
                    .unwrap()
            },
            criterion::BatchSize::PerIteration,
        )
    });

    group.bench_function("hydrafy unpack", |b| {
        b.iter_batched(
            || fresh(&dir.join("hydrafy")),
            |root| {
                let mut applier =
                    Applier::new(&root, ApplyOptions::for_current_user(false)).unwrap();
                let input = input(0, &blob, diff_id);
                unpack(
                    &mut applier,
                    vec![input],
                    &Arc::new(AtomicBool::new(false)),
                    &Recorder::default(),
                )
                .unwrap();
                applier.finish().unwrap();
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();

    // Several disjoint store-path layers, as a Nix layered image has them:
    // one lane (strictly in order) against two applying at once.
    let layers: Vec<(Vec<u8>, Digest)> = (0..8)
        .map(|i| layer_named(500, &format!("{i:032}-bench")))
        .collect();
    let mut group = c.benchmark_group("eight disjoint layers");
    group.throughput(Throughput::Bytes(
        layers.iter().map(|(b, _)| b.len() as u64).sum(),
    ));
    group.sample_size(20);
    for lanes in [1, 2] {
        group.bench_function(format!("hydrafy unpack, {lanes} lane(s)"), |b| {
            b.iter_batched(
                || fresh(&dir.join("lanes")),
                |root| {
                    let mut applier =
                        Applier::new(&root, ApplyOptions::for_current_user(false)).unwrap();
                    applier.set_lanes(lanes);
                    let inputs = layers
                        .iter()
                        .enumerate()
                        .map(|(i, (blob, diff_id))| input(i, blob, *diff_id))
                        .collect();
                    unpack(
                        &mut applier,
                        inputs,
                        &Arc::new(AtomicBool::new(false)),
                        &Recorder::default(),
                    )
                    .unwrap();
                    applier.finish().unwrap();
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
    let _ = hydrafy::unpack::remove_tree(&dir);
}

/// A gzip layer blob held in memory as pipeline input.
fn input(index: usize, blob: &[u8], diff_id: Digest) -> LayerInput {
    let bytes = blob.to_vec();
    LayerInput {
        index,
        descriptor: Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: Digest::of(&bytes),
            size: bytes.len() as u64,
            platform: None,
            urls: None,
            annotations: None,
        },
        diff_id,
        compression: Compression::Gzip,
        open: Box::new(move || Ok(Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read + Send>)),
        verify_blob: true,
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
