"""Building and updating a bundle's catalog index (``catalog-search index``): walk an
ABO-layout catalog, embed its photos with the bundle's model (resumably, see
:mod:`retrieval.resume`), apply an update incrementally (added, removed and changed
listings and photos; compaction when too many slots are deleted ones), and publish the new
files through the manifest's atomic replace, one writer per bundle at a time.

Imports: :mod:`retrieval.vectors`, :mod:`retrieval.embedding`, :mod:`retrieval.bundle_index`,
:mod:`retrieval.resume`, :mod:`retrieval.store`, :mod:`common`, :mod:`catalog` and
:mod:`export`; never :mod:`retrieval.search` (only the command line imports this module).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import FedcbirError
from retrieval.bundle_index import (FILE_ROLES, INDEX_DIR, INDEX_FORMAT, INDEX_FORMAT_VERSION, INDEX_KEY, CatalogIndex,
                                    check_entry, check_model, entry_path, file_record, generation_paths,
                                    new_generation)
from retrieval.embedding import iter_embedded, load_model, model_record, open_bundle, preprocess_of
from retrieval.resume import CatalogPaths, Partial, Work, resume_key, stat_pair
from retrieval.vectors import (EXACT_DTYPE, EXPANSION_SEARCH, METRIC, IndexFileError, add_vectors, check_dtype, header,
                               needs_compaction, new_index, save_npy, sha256_file, usearch_index)


# ----------------------------------------------------------------------------- building and updating


class _BundleLock:
    """An exclusive ``flock`` on the bundle folder itself (no lock file is left behind)."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = bundle_dir
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.bundle_dir, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise FedcbirError(f"another 'catalog-search index' is writing to {self.bundle_dir}; try again when it ends") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def _segment_saved(segment: int) -> None:
    """Called after each segment is on disk. ``FEDCBIR_INDEX_SEGMENT_PAUSE`` (seconds) slows
    a build down here, so tests and demonstrations can interrupt it part-way."""
    pause = os.environ.get("FEDCBIR_INDEX_SEGMENT_PAUSE")
    if pause:
        import time

        time.sleep(float(pause))


def _utc_now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _publish(bundle, new_paths: dict[str, Path], entry: dict) -> None:
    """Record the new files in the manifest (atomic replace), then delete the previous ones."""
    from export.manifest import MANIFEST
    from export.runtime import read_manifest
    from common.io import write_json_atomic

    bundle_dir = Path(bundle.path)
    entry["files"] = {role: file_record(bundle_dir, p) for role, p in new_paths.items()}
    manifest = read_manifest(bundle_dir)  # fresh copy: keep everything the export package wrote
    old = manifest.get(INDEX_KEY)
    manifest[INDEX_KEY] = entry
    write_json_atomic(bundle_dir / MANIFEST, manifest)
    bundle.manifest = manifest
    if isinstance(old, dict):
        for role in FILE_ROLES:
            try:
                p = entry_path(bundle_dir, old, role)
            except IndexFileError:
                continue
            if p is not None and p not in new_paths.values() and p.is_file():
                p.unlink()


def build_catalog_index(bundle_path: str | os.PathLike, catalog_root: str | os.PathLike, *,
                        runtime: str | None = None, precision: str | None = None, dtype: str | None = None,
                        update: bool = False, threads: int = 1, workers: int = 2, batch_size: int = 32,
                        progress: bool = True, segment_images: int = 1024) -> dict[str, Any]:
    """``catalog-search index``: embed the catalog's photos, build the index + store, publish.

    ``update=True`` applies added, removed and changed listings and photos to the existing
    index (same model and dtype) instead of re-embedding everything; it rebuilds the graph
    only when more than a quarter of its slots would be deleted ones ("compaction").
    Returns a report (counts, skipped photos, timings). The bundle changes only at the
    final manifest replace; on any error it is left as it was, except that an interrupted
    run (Ctrl-C, a kill, a crash) leaves the photos it embedded in ``index/.work/`` (one
    file per ``segment_images`` photos, each written atomically): the next run with the
    same model, catalog, work list and batch size reuses them and embeds only the rest
    (``report["resumed"]``), and any other run removes them.

    ``workers`` threads decode photos ahead of the embedding (a pipeline); ``threads`` is
    the runtime's own thread count (and usearch's when adding). Memory holds a few chunks
    of ``4 x batch_size`` photos and one segment of vectors besides the index itself.
    """
    if workers < 1 or threads < 1 or batch_size < 1 or segment_images < 1:
        raise FedcbirError("workers, threads, batch size and segment size must be >= 1")
    bundle = open_bundle(bundle_path, check="all")
    # one writer at a time; the manifest is read again under the lock
    with _BundleLock(Path(bundle.path)):
        bundle = open_bundle(bundle_path, check="lazy")
        return _build_locked(bundle, catalog_root, runtime=runtime, precision=precision, dtype=dtype, update=update,
                             threads=threads, workers=workers, batch_size=batch_size, progress=progress,
                             segment_images=segment_images)


def _build_locked(bundle, catalog_root, *, runtime, precision, dtype, update, threads, workers, batch_size,
                  progress, segment_images) -> dict[str, Any]:
    import time

    from catalog.abo import AboCatalog, IMAGES_DIR
    from common.progress import progress_bar

    t_start = time.perf_counter()
    bundle_dir = Path(bundle.path)
    catalog = AboCatalog(catalog_root)
    root = Path(catalog.root).resolve()
    old_entry = bundle.manifest.get(INDEX_KEY)
    if update and old_entry is None:
        raise FedcbirError(f"bundle {bundle_dir} has no index to update; run 'catalog-search index' without --update")
    if update:
        check_entry(old_entry)
        old_model = old_entry.get("model") or {}
        if runtime is None and precision is None:
            runtime, precision = old_model.get("runtime"), old_model.get("precision")
        if dtype is not None and dtype != old_entry["dtype"]:
            raise FedcbirError(f"--update keeps the index dtype ({old_entry['dtype']}); run without --update "
                               f"to rebuild it as {dtype}")
        dtype = old_entry["dtype"]
    dtype = check_dtype(dtype or "f16")
    embedder = load_model(bundle, runtime, precision, threads)  # imports the runtime before usearch
    pre = preprocess_of(bundle, embedder)
    rec = model_record(bundle, embedder)
    if update:
        if (old_entry.get("model") or {}).get("file") != rec["file"]:
            raise FedcbirError(f"the index was built with {old_entry['model'].get('file')}, not {rec['file']}: "
                               "mixing models in one index would make scores meaningless; rebuild without --update")
        check_model(old_entry, bundle, embedder)
    products = list(catalog.products())
    if not products:
        raise FedcbirError(f"catalog {root} has no usable products")
    ui = usearch_index()
    gen = new_generation()
    paths = generation_paths(bundle_dir, gen, ("index", "store", "keys", "vectors") if dtype in EXACT_DTYPE
                             else ("index", "store"))
    made_dir = not (bundle_dir / INDEX_DIR).exists()
    (bundle_dir / INDEX_DIR).mkdir(exist_ok=True)
    for stale in (bundle_dir / INDEX_DIR).glob(".catalog-*.tmp"):
        stale.unlink()  # left by a killed run (we hold the bundle's lock: no other writer)
    tmp = {r: p.with_name("." + p.name + ".tmp") for r, p in paths.items()}
    partial = None
    report: dict[str, Any] = {"bundle": str(bundle_dir), "catalog": str(root), "dtype": dtype, "update": update,
                              "model": {k: rec[k] for k in ("file", "runtime", "precision", "dim")}}
    try:
        store, index, exact, work, removed, changed_meta, compacted = _prepare(
            bundle, old_entry if update else None, products, root, dtype, tmp, embedder, ui)
        report.update(products=len(products), to_embed=len(work.items), removed_images=len(removed),
                      changed_listings=changed_meta)
        if update and not work.items and not removed and not changed_meta:
            store.close()
            for p in tmp.values():
                p.unlink(missing_ok=True)
            report.update(status="up to date", seconds=round(time.perf_counter() - t_start, 2))
            return report
        # embed: finished segments persist in the bundle's index work folder, so an
        # interrupted run (Ctrl-C, a kill, a crash) resumes where it stopped
        partial = Partial.begin(bundle_dir, resume_key(rec, root, old_entry if update else None, work,
                                                       batch_size, segment_images),
                                len(work.items), segment_images)
        photos = CatalogPaths(root / IMAGES_DIR, work.items)
        t_embed = time.perf_counter()
        reused = partial.reusable(photos)
        todo = [g for g in range(partial.segments) if g not in reused]
        reused_photos = sum(len(partial.segment_range(g)) for g in reused)
        chunk = max(1, batch_size) * 4
        chunks = [range(c, min(r.stop, c + chunk)) for g in todo for r in [partial.segment_range(g)]
                  for c in range(r.start, r.stop, chunk)]
        bar = progress_bar(progress and bool(work.items))
        embedded_now = 0
        try:
            if bar is not None:
                bar.start()
                task = bar.add_task("embedding catalog photos" + (f" (resumed: {reused_photos} done before)"
                                                                  if reused_photos else ""),
                                    total=len(work.items), completed=reused_photos)
            pending: dict[int, list] = {}
            for ch, infos, vectors, ok in iter_embedded(embedder, pre, photos, chunks, batch_size=batch_size,
                                                        workers=workers, with_hash=True):
                g = ch.start // partial.segment_images
                pending.setdefault(g, []).append((ch, infos, vectors, ok))
                embedded_now += len(ch)
                if bar is not None:
                    bar.advance(task, len(ch))
                if ch.stop == partial.segment_range(g).stop:
                    partial.save(g, pending.pop(g), photos)
                    _segment_saved(g)
        finally:
            if bar is not None:
                bar.stop()
        embed_s = time.perf_counter() - t_embed
        # add to the store and the index, segment by segment (keys in work order, as one pass would)
        t_index = time.perf_counter()
        skipped = []
        n_ok = 0
        bar = progress_bar(progress and partial.segments > 1)
        try:
            if bar is not None:
                bar.start()
                task = bar.add_task("adding to the index", total=len(work.items))
            new_exact = []
            for g in range(partial.segments):
                seg = partial.load(g)
                r = partial.segment_range(g)
                new_keys = store.allocate_keys(len(seg["ok"]))
                ok_set = set(seg["ok"].tolist())
                for j in range(len(r)):
                    if j not in ok_set:
                        item_id, rel, _ = work.items[r.start + j]
                        why = str(seg["errors"][j])
                        skipped.append((item_id, rel, why))
                        store.record_skipped(item_id, rel, why, int(seg["size"][j]), int(seg["mtime"][j]))
                for key, j in zip(new_keys, seg["ok"].tolist()):
                    item_id, rel, is_main = work.items[r.start + j]
                    store.add_image(key, item_id, rel, is_main, int(seg["size"][j]), int(seg["mtime"][j]),
                                    seg["sha256"][j].decode("ascii"))
                add_vectors(index, new_keys, seg["vectors"], threads=max(1, threads))
                if exact is not None:
                    new_exact.append((np.asarray(new_keys, np.uint64), seg["vectors"].astype(np.float16)))
                n_ok += len(new_keys)
                if bar is not None:
                    bar.advance(task, len(r))
        finally:
            if bar is not None:
                bar.stop()
        if exact is not None and new_exact:
            all_keys = np.concatenate([exact[0]] + [k for k, _ in new_exact])
            order = np.argsort(all_keys, kind="stable")
            exact = (all_keys[order], np.concatenate([exact[1]] + [v for _, v in new_exact])[order])
            del new_exact
        index.save(os.fspath(tmp["index"]))
        if update and needs_compaction(tmp["index"]):
            index = _rebuild(index, exact, dtype, ui, threads)
            index.save(os.fspath(tmp["index"]))
            compacted = True
        index_s = time.perf_counter() - t_index
        if exact is not None:
            save_npy(tmp["keys"], exact[0])
            save_npy(tmp["vectors"], exact[1])
        counts = store.counts()
        if counts["images"] == 0:
            raise FedcbirError(f"none of the catalog's {len(work.items)} photos could be used "
                               f"(e.g. {skipped[0][2] if skipped else 'no photos'}); the bundle was not changed")
        store.set_meta("generation", gen)
        store.commit_and_close()
        meta = header(tmp["index"])
        if int(meta.get("count_present", -1)) != counts["images"]:
            raise FedcbirError(f"internal error: the index holds {meta.get('count_present')} vectors but the "
                               f"store {counts['images']} photos; the bundle was not changed")
        for r, p in tmp.items():
            os.replace(p, paths[r])
        now = _utc_now()
        entry = {
            "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "generation": gen,
            "dtype": dtype, "metric": METRIC, "ndim": int(embedder.dim), "count": counts["images"],
            "products": counts["products"], "skipped": counts["skipped"],
            "deleted_slots": int(meta.get("count_deleted", 0)),
            "connectivity": int(index.connectivity), "expansion_add": int(index.expansion_add),
            "expansion_search": EXPANSION_SEARCH, "exact_vectors": EXACT_DTYPE.get(dtype),
            "usearch_version": _usearch_version(), "model": rec,
            "catalog": {"root": str(root), "products": len(products), "images": sum(len(p.images) for p in products)},
            "built": (old_entry or {}).get("built") if update else now, "updated": now if update else None,
            "fedcbir_version": _fedcbir_version(),
        }
        _publish(bundle, paths, entry)
        if partial is not None:
            partial.remove()  # done: nothing to resume
    except BaseException as exc:
        for p in list(tmp.values()) + list(paths.values()):
            if p.exists() and p not in _current_files(bundle_dir):
                p.unlink()
        if partial is not None and isinstance(exc, FedcbirError):
            partial.remove()  # a refusal (bad data, bad model) would only fail the same way again
        if made_dir and partial is not None and partial.dir.exists():
            made_dir = False  # the work folder stays for the next run
        if made_dir:
            try:
                (bundle_dir / INDEX_DIR).rmdir()
            except OSError:
                pass
        raise
    report.update(
        status="updated" if update else "built", generation=gen, images=counts["images"],
        indexed_products=counts["products"], embedded=n_ok, embedded_now=embedded_now, resumed=reused_photos,
        skipped=len(skipped),
        skipped_examples=[{"item_id": i, "image": r, "reason": why} for i, r, why in skipped[:10]],
        compacted=compacted, deleted_slots=entry["deleted_slots"],
        embed_seconds=round(embed_s, 2),
        images_per_second=round(embedded_now / embed_s, 1) if embedded_now and embed_s > 0 else None,
        workers=workers, threads=threads,
        index_seconds=round(index_s, 2), seconds=round(time.perf_counter() - t_start, 2),
        files={r: entry["files"][r]["path"] for r in entry["files"]},
        bytes=sum(int(f["bytes"]) for f in entry["files"].values()))
    return report


def _current_files(bundle_dir: Path) -> set[Path]:
    """Files the bundle's manifest references right now (never deleted on failure)."""
    import json

    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
        entry = manifest.get(INDEX_KEY) or {}
        return {p for r in FILE_ROLES if (p := entry_path(bundle_dir, entry, r)) is not None}
    except Exception:  # noqa: BLE001
        return set()


def _usearch_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("usearch")
    except metadata.PackageNotFoundError:
        return None


def _fedcbir_version() -> str:
    from common import __version__

    return __version__


def _rebuild(index, exact, dtype, ui, threads):
    """A fresh graph from the present vectors (compaction: deleted slots are dropped)."""
    keys = np.asarray(index.keys, dtype=np.uint64) if exact is None else exact[0]
    keys = np.sort(keys)
    if exact is not None:
        vectors = np.asarray(exact[1], dtype=np.float32)
    elif len(keys):
        got = index.get(keys, dtype=np.float32)
        vectors = np.stack(got) if isinstance(got, tuple) else np.asarray(got)
    else:
        vectors = np.zeros((0, index.ndim), np.float32)
    fresh = new_index(index.ndim, dtype)
    add_vectors(fresh, keys, vectors, threads=max(1, threads))
    return fresh


def _prepare(bundle, old_entry, products, root: Path, dtype: str, tmp: dict, embedder, ui):
    """A writable store + index (fresh, or copies of the current ones) and the photos to embed."""
    from catalog.abo import IMAGES_DIR
    from retrieval.store import Store, listing_hash

    bundle_dir = Path(bundle.path)
    work = Work()
    removed: list[int] = []
    changed_meta = 0
    if old_entry is None:
        store = Store.create(tmp["store"], root)
        for p in products:
            store.put_product(p)
            for j, rel in enumerate(p.images):
                work.items.append((p.item_id, rel, j == 0 and p.main_image is not None))
        index = new_index(embedder.dim, dtype)
        exact = (np.zeros(0, np.uint64), np.zeros((0, embedder.dim), np.float16)) if dtype in EXACT_DTYPE else None
        return store, index, exact, work, removed, changed_meta, False

    current = CatalogIndex.open(bundle_dir, old_entry, view=False)  # verified private copy
    try:
        index = current.vectors.index
        exact = None
        if current.vectors.exact is not None:
            exact = (np.array(current.vectors.exact.keys), np.array(current.vectors.exact.vectors))
        old_root = Path(current.store.catalog_root)
    finally:
        current.close()
    if old_root != root:
        raise FedcbirError(f"the index was built from catalog {old_root}, not {root}; "
                           "run without --update to index another catalog")
    store = Store.copy_for_update(entry_path(bundle_dir, old_entry, "store"), tmp["store"])
    hashes = store.listing_hashes()
    skipped = store.skipped_files()
    seen: set[str] = set()
    for p in products:
        seen.add(p.item_id)
        fingerprint = listing_hash(p)
        if hashes.get(p.item_id) != fingerprint:
            if p.item_id in hashes:
                changed_meta += 1
            store.put_product(p, fingerprint)
        have = {img.path: img for img in store.images_of(p.item_id)}
        wanted = {rel: (j == 0 and p.main_image is not None) for j, rel in enumerate(p.images)}
        for rel, img in have.items():
            if rel not in wanted:
                removed.append(img.key)
        for rel, is_main in wanted.items():
            img = have.get(rel)
            path = root / IMAGES_DIR / rel
            if img is None:
                # new photo, or one that failed before: retried only if its file changed since
                if (p.item_id, rel) not in skipped or skipped[(p.item_id, rel)] != stat_pair(path):
                    work.items.append((p.item_id, rel, is_main))
            elif _file_changed(path, img, store):
                removed.append(img.key)
                work.items.append((p.item_id, rel, is_main))
            elif img.is_main != is_main:
                store.set_main(img.key, is_main)
                changed_meta += 1
        for item_id_rel in [k for k in skipped if k[0] == p.item_id and k[1] not in wanted]:
            store.forget_skipped(*item_id_rel)
    for item_id in set(hashes) - seen:
        removed.extend(store.delete_product(item_id))
    # the photos being re-embedded lose their old keys
    store.delete_images(removed)
    if removed:
        index.remove(np.asarray(removed, dtype=np.uint64))
        if exact is not None:
            keep = ~np.isin(exact[0], np.asarray(removed, dtype=np.uint64))
            exact = (exact[0][keep], exact[1][keep])
    return store, index, exact, work, removed, changed_meta, False


def _file_changed(path: Path, img, store) -> bool:
    """Has a photo's content changed since it was indexed (size/mtime first, then sha256)?"""
    try:
        st = path.stat()
    except OSError:
        return True  # gone or unreadable: re-embedding will record why
    if st.st_size == img.file_size and st.st_mtime_ns == img.file_mtime_ns:
        return False
    try:
        same = sha256_file(path) == img.file_sha256
    except OSError:
        return True
    if same:
        store.touch_image(img.key, st.st_size, st.st_mtime_ns)
    return not same
