"""Episode files, the memory-mapped frame cache, and balanced batches for every training stage.

Episode file layout (the one definition; format version EPISODE_VERSION), one `.npz` per episode,
one row per control step t (a decision every k env frames):

    obs          uint8   [T,64,64,3]  the frame the policy saw at step t (area-resampled from 96x96)
    action       float32 [T,3]        steer (-1 left..+1 right), gas (0..1), brake (0..1), held for k frames after obs[t]
    reward       float32 [T]          env reward summed over those k frames
    done         bool    [T]          True on the last row when the episode ended (lap, timeout or off the map)
    speed        float32 [T]          privileged state at obs[t], for labels / probes / evaluation only:
    yaw_rate     float32 [T]            angular velocity (rad/s, + = turning left)
    on_road      bool    [T]            any wheel on a road tile
    lateral      float32 [T]            signed offset from the centre line (units, + = right of it)
    heading_err  float32 [T]            angle between the car's nose and the track direction (rad, + = nose left)
    tiles        int32   [T]            tiles visited so far
    mistake      int8    [T]          injected mistake active at step t (MISTAKES; 0 = none, always 0 outside recovery data)
    expert_action float32 [T,3]       what the expert would do at obs[t], whoever drove (privileged: a training label
                                        only); NaN in files of format 1, which predate it
    meta         str                  JSON: source, track_seed, seed, episode, k, score, lap_finished, versions, ...

Usage in training:

    data = EpisodeData({"race": "data_race", "recovery": "data_recovery", "random": "data"}, split="train")
    for batch in BalancedBatches(data, batch_size=256, kind="frames", seed=0).epoch(0): ...
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import warnings
import zipfile
from pathlib import Path
from queue import Queue

import numpy as np

from presets import atomic_write

EPISODE_VERSION = 2
FRAME_SHAPE = (64, 64, 3)
FRAME_BYTES = int(np.prod(FRAME_SHAPE))
# Per-row columns: name -> (dtype, trailing shape). `obs` is stored apart, in the frame cache.
COLUMNS = {
    "action": (np.float32, (3,)),
    "reward": (np.float32, ()),
    "done": (np.bool_, ()),
    "speed": (np.float32, ()),
    "yaw_rate": (np.float32, ()),
    "on_road": (np.bool_, ()),
    "lateral": (np.float32, ()),
    "heading_err": (np.float32, ()),
    "tiles": (np.int32, ()),
    "mistake": (np.int8, ()),
    "expert_action": (np.float32, (3,)),
}
MISTAKES = {0: "none", 1: "understeer", 2: "oversteer", 3: "late_brake", 4: "panic", 5: "steer_lock"}


class EpisodeError(ValueError):
    """An episode file that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------- episode files
def validate_episode(arrays: dict, where: str = "episode") -> int:
    """Check keys, dtypes and shapes; return T. Raises EpisodeError naming `where`."""
    if "obs" not in arrays:
        raise EpisodeError(f"{where}: missing key 'obs'")
    obs = arrays["obs"]
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[1:] != FRAME_SHAPE:
        raise EpisodeError(f"{where}: obs must be uint8 [T,64,64,3], got {obs.dtype} {list(obs.shape)}")
    t = obs.shape[0]
    if t == 0:
        raise EpisodeError(f"{where}: episode has no rows")
    for name, (dtype, tail) in COLUMNS.items():
        if name not in arrays:
            raise EpisodeError(f"{where}: missing key {name!r}")
        a = arrays[name]
        if a.dtype != dtype or a.shape != (t, *tail):
            raise EpisodeError(f"{where}: {name} must be {np.dtype(dtype).name} {[t, *tail]}, "
                               f"got {a.dtype} {list(a.shape)}")
    return t


def write_episode(path: str | os.PathLike, arrays: dict, meta: dict) -> None:
    """Validate and write one episode atomically (temp file + rename: a killed run leaves no partial file).

    Drives without injected mistakes (every policy but the recovery collector's) may leave `mistake` out:
    it is written as zeros."""
    if "obs" in arrays and "mistake" not in arrays:
        arrays = {**arrays, "mistake": np.zeros(len(arrays["obs"]), np.int8)}
    validate_episode(arrays, str(path))
    payload = {"obs": arrays["obs"], **{n: arrays[n] for n in COLUMNS}}
    meta = {"format_version": EPISODE_VERSION, **meta}
    atomic_write(path, lambda f: np.savez_compressed(f, meta=np.array(json.dumps(meta)), **payload))


def read_episode(path: str | os.PathLike) -> tuple[dict, dict]:
    """Load and validate one episode file -> (arrays, meta). Any problem raises EpisodeError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"])) if "meta" in z.files else None
    except EpisodeError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise EpisodeError(f"{path}: unreadable episode file ({type(e).__name__}: {e})") from None
    if meta is None:
        raise EpisodeError(f"{path}: missing key 'meta'")
    if meta.get("format_version") == 1 and "expert_action" not in arrays and "obs" in arrays:
        arrays["expert_action"] = np.full((len(arrays["obs"]), 3), np.nan, np.float32)   # unlabelled
    validate_episode(arrays, str(path))
    return arrays, meta


def episode_name(seed: int, index: int, rows: int) -> str:
    """File name of episode `index` of a run with base seed `seed`; the row count lets resume count frames fast."""
    return f"s{seed}_ep{index:06d}_T{rows}.npz"


def finished_episodes(folder: str | os.PathLike, seed: int) -> dict[int, int]:
    """{episode index: rows} of the complete episode files of base seed `seed` in `folder`."""
    done = {}
    for p in Path(folder).glob(f"s{seed}_ep*_T*.npz"):
        try:
            idx, rows = p.stem.split("_ep")[1].split("_T")
            done[int(idx)] = int(rows)
        except ValueError:
            continue
    return done


# ---------------------------------------------------------------- the frame cache
class SourceCache:
    """All episodes of one folder as flat files under `<folder>/.cache/`, built once, extended as episodes appear.

    obs.bin holds every frame back to back ([N,64,64,3] uint8); each column of COLUMNS has its own flat
    file; manifest.json lists the episodes (file, first row, length, meta). Frames are read with
    os.pread into small buffers, so the process holds only the batches it is working on: the page
    cache (the kernel's, not ours) decides what stays in RAM, and peak RSS does not grow with the dataset.
    """

    def __init__(self, folder: str | os.PathLike, strict: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data folder {self.folder} does not exist: run its collector first "
                                    "(collect_race_data.py, collect_recovery_data.py or collect_data.py)")
        self.dir = self.folder / ".cache"
        self.dir.mkdir(exist_ok=True)
        self.bad: list[str] = []
        with open(self.dir / "lock", "w") as lock:        # one builder at a time (e.g. torchrun ranks)
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._update(strict)
        if not self.episodes:
            raise FileNotFoundError(f"data folder {self.folder} holds no usable episode files (*.npz)")
        self._fd = os.open(self.dir / "obs.bin", os.O_RDONLY)
        self.columns = {n: np.memmap(self.dir / f"{n}.bin", dtype=d, mode="r", shape=(self.rows, *s))
                        for n, (d, s) in COLUMNS.items()}
        self.starts = np.array([e["start"] for e in self.episodes], np.int64)
        self.lengths = np.array([e["length"] for e in self.episodes], np.int64)

    def _update(self, strict: bool) -> None:
        manifest_path = self.dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        files = {p.name: p for p in sorted(self.folder.glob("*.npz"))}
        if manifest is not None and (manifest.get("version") != EPISODE_VERSION or any(
                e["file"] not in files or files[e["file"]].stat().st_size != e["size"]
                for e in manifest["episodes"])):
            manifest = None                                   # an episode changed or vanished: rebuild
        if manifest is None:
            manifest = {"version": EPISODE_VERSION, "rows": 0, "episodes": [], "bad": {}}
        rows = manifest["rows"]
        known = {e["file"] for e in manifest["episodes"]}
        new = [n for n in files if n not in known and manifest["bad"].get(n) != files[n].stat().st_size]
        mode = "r+b" if rows else "w+b"
        handles = {n: open(self.dir / f"{n}.bin", mode) for n in ["obs", *COLUMNS]}
        try:
            for h in handles.values():                         # drop any tail a killed build appended
                h.truncate(rows * self._row_bytes(h.name))
                h.seek(0, os.SEEK_END)
            for name in new:
                try:
                    arrays, meta = read_episode(files[name])
                except EpisodeError as e:
                    if strict:
                        raise
                    warnings.warn(f"skipping {e}")
                    manifest["bad"][name] = files[name].stat().st_size
                    continue
                t = len(arrays["obs"])
                handles["obs"].write(arrays["obs"].tobytes())
                for n in COLUMNS:
                    handles[n].write(np.ascontiguousarray(arrays[n]).tobytes())
                manifest["episodes"].append({"file": name, "start": rows, "length": t,
                                             "size": files[name].stat().st_size, "meta": meta})
                rows += t
        finally:
            for h in handles.values():
                h.close()
        manifest["rows"] = rows
        if new:
            atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest).encode()))
        self.bad = sorted(manifest["bad"])
        self.episodes, self.rows = manifest["episodes"], rows
        ks = {e["meta"].get("k") for e in self.episodes}
        if len(ks) > 1:
            raise EpisodeError(f"{self.folder}: episodes were collected with different control periods {ks}")
        self.k = ks.pop() if ks else None

    def _row_bytes(self, path: str) -> int:
        name = Path(path).stem
        if name == "obs":
            return FRAME_BYTES
        dtype, shape = COLUMNS[name]
        return int(np.dtype(dtype).itemsize * np.prod(shape, dtype=np.int64))

    def frames(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [B,64,64,3] for the given row numbers (any order)."""
        out = np.empty((len(rows), *FRAME_SHAPE), np.uint8)
        flat = out.reshape(len(rows), FRAME_BYTES)
        for i in np.argsort(rows, kind="stable"):             # in file order: kinder to the disk
            flat[i] = np.frombuffer(os.pread(self._fd, FRAME_BYTES, int(rows[i]) * FRAME_BYTES), np.uint8)
        return out

    def frame_runs(self, starts: np.ndarray, length: int) -> np.ndarray:
        """uint8 [B,length,64,64,3]: `length` consecutive rows from each start (one read per run)."""
        out = np.empty((len(starts), length * FRAME_BYTES), np.uint8)
        for i in np.argsort(starts, kind="stable"):
            out[i] = np.frombuffer(os.pread(self._fd, length * FRAME_BYTES, int(starts[i]) * FRAME_BYTES), np.uint8)
        return out.reshape(len(starts), length, *FRAME_SHAPE)

    def close(self) -> None:
        os.close(self._fd)


# ---------------------------------------------------------------- splits and views
def is_validation(name: str, val_frac: float, seed: int) -> bool:
    """Split by episode from a hash of (seed, file name): adding episodes never moves existing ones."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64 < val_frac


class EpisodeData:
    """One split (train or val) of several source folders. `sources` maps a name to a folder."""

    def __init__(self, sources: dict[str, str], split: str = "train", val_frac: float = 0.1,
                 seed: int = 0, strict: bool = False):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        if not sources:
            raise ValueError("no data sources given")
        self.names = list(sources)
        self.caches = [SourceCache(folder, strict=strict) for folder in sources.values()]
        ks = {c.k for c in self.caches}
        if len(ks) > 1:
            raise EpisodeError(f"sources were collected with different control periods: "
                               f"{dict(zip(self.names, (c.k for c in self.caches)))}")
        self.k = ks.pop()
        self.episode_ids = []                                 # per source: indices into cache.episodes
        for name, cache in zip(self.names, self.caches):
            files = [e["file"] for e in cache.episodes]
            val = np.array([is_validation(f, val_frac, seed) for f in files])
            if len(files) >= 2 and 0 < val_frac < 1 and (val.all() or not val.any()):
                # Too few episodes for the hash to split: hand over the one with the lowest hash, so
                # both splits are non-empty. Only tiny datasets ever get here.
                order = sorted(range(len(files)), key=lambda i: hashlib.sha256(f"{seed}:{files[i]}".encode()).digest())
                val[order[0]] = not val[order[0]]
            keep = {"train": ~val, "val": val, "all": np.ones_like(val)}[split]
            ids = np.flatnonzero(keep)
            if len(ids) == 0:
                raise FileNotFoundError(f"source {name!r} ({cache.folder}) has no {split} episodes")
            self.episode_ids.append(ids)
        self.bad_files = [str(c.folder / b) for c in self.caches for b in c.bad]

    def rows(self, source: int) -> np.ndarray:
        """Row numbers (into the source's cache) of every frame of this split."""
        c, ids = self.caches[source], self.episode_ids[source]
        return np.concatenate([np.arange(c.starts[i], c.starts[i] + c.lengths[i]) for i in ids])

    def window_starts(self, source: int, horizon: int) -> np.ndarray:
        """First rows of every window of horizon+1 consecutive rows inside one episode (never across)."""
        c, ids = self.caches[source], self.episode_ids[source]
        parts = [np.arange(c.starts[i], c.starts[i] + c.lengths[i] - horizon) for i in ids
                 if c.lengths[i] > horizon]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def batch_counts(batch_size: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples per source: floor(share * B) each, the few left over given by chance (so each is +-1 of its share)."""
    exact = shares * batch_size
    counts = np.floor(exact).astype(np.int64)
    left = batch_size - counts.sum()
    if left:
        frac = exact - counts
        extra = rng.choice(len(shares), size=left, replace=False, p=frac / frac.sum())
        counts[extra] += 1
    return counts


class BalancedBatches:
    """Batches that hold each source's share, whatever the sources' sizes.

    kind="frames": {"obs": uint8 [B,64,64,3], "source": int64 [B], and every column [B,...]}.
    kind="windows": {"obs": uint8 [B,H+1,64,64,3], "action": float32 [B,H,3] (action t leads from obs t
    to obs t+1), other columns [B,H+1,...], "source": [B]}.
    Inside a source, rows are drawn without replacement from a reshuffled order, so an epoch of a
    source sees each row once before any repeats.
    """

    def __init__(self, data: EpisodeData, batch_size: int, kind: str = "frames", horizon: int = 15,
                 shares: dict[str, float] | None = None, seed: int = 0, batches_per_epoch: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if kind not in ("frames", "windows"):
            raise ValueError(f"kind must be frames or windows, got {kind!r}")
        self.data, self.batch_size, self.kind, self.horizon = data, batch_size, kind, horizon
        self.seed, self.rank, self.world_size = seed, rank, world_size
        w = np.array([(shares or {}).get(n, 1.0) for n in data.names], np.float64)
        self.shares = w / w.sum()
        self.pools = [data.rows(i) if kind == "frames" else data.window_starts(i, horizon)
                      for i in range(len(data.names))]
        for name, pool, share in zip(data.names, self.pools, self.shares):
            if share > 0 and len(pool) == 0:
                raise ValueError(f"source {name!r} has no {kind} (episodes shorter than {horizon + 1} rows?)")
        total = sum(len(p) for p in self.pools)
        self.batches_per_epoch = batches_per_epoch or max(1, total // (batch_size * world_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int):
        """Yield this rank's batches of `epoch`; the same (seed, epoch, rank) gives the same batches."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        orders = [rng.permutation(p) for p in self.pools]
        cursors = [0] * len(self.pools)
        for _ in range(self.batches_per_epoch):
            counts = batch_counts(self.batch_size, self.shares, rng)
            parts, src = [], []
            for s, n in enumerate(counts):
                take = []
                while n > 0:
                    if cursors[s] == len(orders[s]):
                        orders[s], cursors[s] = rng.permutation(self.pools[s]), 0
                    chunk = orders[s][cursors[s]:cursors[s] + n]
                    cursors[s] += len(chunk)
                    take.append(chunk)
                    n -= len(chunk)
                parts.append(np.concatenate(take) if take else np.zeros(0, np.int64))
                src.append(np.full(counts[s], s, np.int64))
            yield self._gather(parts, np.concatenate(src))

    def _gather(self, parts: list[np.ndarray], source: np.ndarray) -> dict:
        h = self.horizon
        obs, cols = [], {n: [] for n in COLUMNS}
        for s, rows in enumerate(parts):
            cache = self.data.caches[s]
            if self.kind == "frames":
                obs.append(cache.frames(rows))
                for n in COLUMNS:
                    cols[n].append(cache.columns[n][rows])
            else:
                obs.append(cache.frame_runs(rows, h + 1))
                idx = rows[:, None] + np.arange(h + 1)[None, :]
                for n in COLUMNS:
                    v = cache.columns[n][idx]
                    cols[n].append(v[:, :h] if n == "action" else v)
        batch = {"obs": np.concatenate(obs), "source": source}
        batch.update({n: np.concatenate(v) for n, v in cols.items()})
        return batch


class LatentCache:
    """Latents of every row of every source, for one encoder checkpoint, memory-mapped beside the frame cache.

    `<folder>/.cache/latents_<key>.f32` is [rows, D] float32, row-aligned with the frame cache, so the
    frame cache's episodes and columns serve the latents too. `key` is the checkpoint's content hash:
    another checkpoint gets another file, never a stale one. Rows added since the last run are encoded
    on the next (the file grows with the frame cache). `encode` maps uint8 [B,64,64,3] -> float32 [B,D].
    """

    def __init__(self, data: "EpisodeData", key: str, dim: int, encode, batch: int = 512, progress=None):
        self.data, self.key, self.dim = data, key, dim
        self.latents = []
        for cache in data.caches:
            path = cache.dir / f"latents_{key}.f32"
            with open(cache.dir / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                done = (path.stat().st_size // (4 * dim)) if path.exists() else 0
                with open(path, "ab") as f:
                    f.truncate(done * 4 * dim)                  # drop a partial row of a killed run
                    for start in range(done, cache.rows, batch):
                        rows = np.arange(start, min(start + batch, cache.rows))
                        z = np.asarray(encode(cache.frames(rows)), np.float32)
                        if z.shape != (len(rows), dim):
                            raise ValueError(f"encode returned {z.shape}, expected {(len(rows), dim)}")
                        f.write(z.tobytes())
                        if progress is not None:
                            progress(len(rows))
            self.latents.append(np.memmap(path, np.float32, mode="r", shape=(cache.rows, dim)))

    def windows(self, source: int, horizon: int, first: int | None = None) -> np.ndarray:
        """Rows t (the 'current' step) such that t .. t+horizon lie in one episode of this split, from each
        episode's first row on (gather pads the history there); with `first`, only each episode's first
        `first` such rows (the start of every drive)."""
        c, ids = self.data.caches[source], self.data.episode_ids[source]
        end = lambda n: n - horizon if first is None else min(n - horizon, first)   # noqa: E731
        parts = [c.starts[i] + np.arange(end(c.lengths[i])) for i in ids if c.lengths[i] > horizon]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def sample_windows(self, source: int, horizon: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to n rows of `windows`, drawn without replacement, in row order (all of them where there are fewer)."""
        pool = self.windows(source, horizon)
        return np.sort(rng.choice(pool, min(n, len(pool)), replace=False))

    def gather(self, source: int, rows: np.ndarray, horizon: int, history: int = 1) -> dict:
        """For current rows [B]: latents [B,history+1+horizon,D] (t-history .. t+horizon), actions [B,horizon,3]
        (held after t .. t+horizon-1), and every other column over t .. t+horizon, with `step`: t's index in its
        episode (0 at the episode's first row).

        History before an episode's first row repeats that row's latent, as the planner's history does at a drive's
        first decision (MPCPolicy.observe): the car stands still there, and a model that never saw the
        padded history dreamt the start as nothing it had learned (README, "Session 27")."""
        starts = self.data.caches[source].starts
        first_row = starts[np.searchsorted(starts, rows, side="right") - 1][:, None]       # [B,1]
        idx = np.maximum(rows[:, None] + np.arange(-history, horizon + 1)[None, :], first_row)
        cols = self.data.caches[source].columns
        fut = idx[:, history:]
        out = {name: np.asarray(cols[name][fut]) for name in COLUMNS if name != "action"}
        out.update(z=np.asarray(self.latents[source][idx]), action=np.asarray(cols["action"][fut[:, :-1]]))
        out["step"] = fut - first_row                                                    # [B,horizon+1]
        return out


def prefetch(iterable, depth: int = 2):
    """Run `iterable` in a background thread, `depth` items ahead (os.pread releases the GIL)."""
    q: Queue = Queue(maxsize=depth)
    end = object()

    def work():
        try:
            for item in iterable:
                q.put(item)
        except BaseException as e:                            # hand the error to the consumer
            q.put(e)
        q.put(end)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item
