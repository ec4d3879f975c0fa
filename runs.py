"""
A training run's folder (train.py's --out_dir), kept so that a user's work is never lost or mixed with another's:

- one run at a time: a run holds a lock on its folder, and a second run is refused with the first one's PID;
- a fresh run refuses a folder holding another run's files, --overwrite deletes exactly those files;
- --resume continues only onto the same settings and the same inputs: ckpt.pt records a fingerprint of the
  prepared data and of the base model's files, and a resume whose inputs changed is refused, naming the file;
- ckpt.pt and every other file are written to a temporary name, then renamed (data.atomic_write), so a kill or a
  full disk at any moment leaves the previous file intact.
"""
import fcntl
import os
import shutil
from pathlib import Path

from data import is_temporary
from errors import UserError
from loaders import FINE_TUNED, file_hash, model_files

# what a run writes: FINE_TUNED is a folder, the model a full fine-tune saves (train.py --method full); SEARCH_FILES
# SSP's search stage (its checkpoint and log), before the retrain writes the others
SEARCH_FILES = ("search.pt", "search.jsonl")
RUN_FILES = ("adapter.pt", "ckpt.pt", "log.jsonl", "predictions.jsonl", "results.json", FINE_TUNED, *SEARCH_FILES)
LOCK = ".train.lock"  # held by the run writing the folder; it holds that run's PID
CKPT_KEYS = {"adapter", "best_adapter", "optimizer", "state", "allocator", "log_bytes", "settings", "inputs"}


def prepare_folder(out_dir: Path):
    """Create out_dir if needed; refuse a path that is a file, lies under one, or cannot be written."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out_dir else f"lies under {parent}, which is"
            raise UserError(f"--out_dir {out_dir} {where} a file, not a folder: choose another --out_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except PermissionError:
        raise UserError(f"--out_dir {out_dir} cannot be written (permission denied): choose a folder you can "
                        "write to, or change its permissions") from None


def lock(out_dir: Path):
    """Take the folder's lock for the life of this process (the OS drops it when the process ends, even killed);
    a folder locked by another run is refused with that run's PID. Returns the open lock file: keep it."""
    f = open(out_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{out_dir} is in use by another train.py run (PID {pid}): two runs writing one folder would "
                        "mix their logs and results. Wait for it to finish, stop it, or choose another --out_dir") \
            from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def clean_up(out_dir: Path, fresh: bool, keep=()):
    """Remove the temporary files of a run killed while writing one (only names data.atomic_write makes); on a
    fresh start, also the files of an earlier run, which would mix with this run's, except those in `keep` (an SSP
    run resumed after its search: the retrain starts afresh, from the search's result)."""
    for path in out_dir.iterdir():
        if any(is_temporary(path, out_dir / name) for name in RUN_FILES):
            remove(path)
    if fresh:
        for name in RUN_FILES:
            if name not in keep:
                remove(out_dir / name)


def remove(path: Path):
    """A run's file, or its model folder, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Fingerprints of a run's inputs


def fingerprint(task_folder, model_path) -> dict:
    """name -> fingerprint of each input of a run: the prepared splits (whole), and the base model's config,
    tokenizer and weight files (their first and last MiB, loaders.file_hash)."""
    prints = {f"data: {name}": file_hash(Path(task_folder) / name, whole=True)
              for name in ("train.jsonl", "dev.jsonl", "test.jsonl") if (Path(task_folder) / name).is_file()}
    return prints | {f"model: {p.name}": file_hash(p, whole=p.suffix == ".json") for p in model_files(model_path)}


def check_inputs(recorded, now, ckpt_path):
    """Refuse a resume whose inputs differ from those the checkpoint recorded, naming each file that changed."""
    if recorded is None:  # a checkpoint from before fingerprints were recorded
        print(f"note: {ckpt_path} records no fingerprint of its data and model (an older train.py wrote it): "
              "they cannot be checked, and are assumed unchanged")
        return
    changed = [f"{name} ({'missing' if name not in now else 'changed'})" for name in recorded
               if now.get(name) != recorded[name]] + [f"{name} (new)" for name in now if name not in recorded]
    if changed:
        raise UserError(f"cannot --resume from {ckpt_path}: its inputs changed since it was written: "
                        f"{'; '.join(changed)}. Restore them, or start afresh with --overwrite")


def check_checkpoint(ckpt, path, params):
    """Refuse a ckpt.pt that is not one train.py wrote for this adapter (hand-edited, another program's, another
    method's), before anything is loaded from it."""
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    missing, extra = (CKPT_KEYS - {"inputs"}) - keys, keys - CKPT_KEYS
    if not isinstance(ckpt, dict) or missing or extra:
        what = f"missing {sorted(missing)}" if missing else f"unknown {sorted(extra)}" if extra else "not a dict"
        raise UserError(f"{path} is not a checkpoint that train.py wrote ({what}): remove it, or pass --overwrite "
                        "to start afresh")
    for part in ("adapter", "best_adapter"):
        tensors = ckpt[part]
        if not isinstance(tensors, dict) or {n: tuple(t.shape) for n, t in tensors.items()} != \
                {n: tuple(p.shape) for n, p in params.items()}:
            raise UserError(f"{path}: its {part} does not hold this run's adapter tensors (hand-edited, or from "
                            "another method): remove it, or pass --overwrite to start afresh")


def cut_log(log_path: Path, log_bytes: int):
    """log.jsonl as it was when the checkpoint was written: the lines after it will be written again. A log that is
    shorter than that was edited by hand: it is kept as it is (never padded), and the gap is said."""
    size = log_path.stat().st_size if log_path.exists() else 0
    if size < log_bytes:
        print(f"note: {log_path} holds {size} bytes, fewer than the {log_bytes} it held at the checkpoint: it was "
              "edited or emptied, and the steps before the checkpoint are missing from it")
        return
    with open(log_path, "r+b") as f:
        f.truncate(log_bytes)
