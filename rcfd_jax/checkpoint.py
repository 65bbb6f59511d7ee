"""Checkpoints under DIR/checkpoints and a clean exit on preemption.

`Checkpointer` is a thin layer over orbax.checkpoint.CheckpointManager that
adds what the trainer needs and Orbax does not give:

- One call saves a pytree of (possibly sharded) arrays together with a small
  JSON `meta` dict (data position, adaptive-beta state, config, metrics
  step), so the two can never come from different steps.
- Typed PRNG keys are stored as `jax.random.key_data` and wrapped back on
  restore; Orbax serialises uint32 arrays, not key arrays.
- `restore_latest` falls back over damaged steps. Orbax lists any finalised
  step directory as a checkpoint even when a file inside it was later
  truncated or deleted, and restoring it raises; we log which step is
  damaged, try the one before, and move the damaged newer steps aside
  (DIR/checkpoints/damaged/) so the resumed run can save those step numbers
  again. With several processes, each reads only its own shards, so they
  agree on every attempt (one allgather) before anyone falls back.
- Once a step is final, its files' sizes are recorded beside them
  (`<step>/rcfd_files.json`). A step whose files no longer match is
  damaged without being read: a failed Orbax restore abandons its other
  reads, and tensorstore then prints a traceback for each of them into the
  log. Steps without the record (the newest one after a crash, or damage
  that keeps sizes) go through Orbax as before.

Crash safety comes from Orbax itself: a step is written into
`<step>.orbax-checkpoint-tmp-<n>` and renamed to `<step>` only once every
process has finished writing (on filesystems with atomic rename; GCS uses a
commit_success.txt file instead). A process killed mid-save leaves only the
tmp directory, which Orbax never lists as a step; `cleanup_tmp_directories`
deletes it in the background once the next Checkpointer opens (Orbax waits
for that before its first save). tests/test_checkpoint.py simulates the
crash by renaming a finished step back to a tmp name and truncating it.

All processes must call save / restore_latest / wait_until_finished / close
together: Orbax and the agreement above synchronise hosts inside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from rcfd_jax import files
from rcfd_jax.errors import UserError

DAMAGED_SUBDIR = "damaged"
FILE_SIZES = "rcfd_files.json"  # in each final step directory: {relative path: bytes} of its other files

# A damaged step surfaces as many exception types: tensorstore's ValueError
# for a short file, FileNotFoundError for missing metadata, and Orbax 0.12
# wraps array read failures in a bare `Exception`. So any Exception counts as
# "this step is unusable"; the guard against discarding good data is that a
# step is moved aside only when an older step then restores cleanly (a
# config/shape mismatch fails every step and moves nothing).
_DAMAGE_ERRORS = (Exception,)


def _short(error: BaseException, limit: int = 300) -> str:
  """First line of an error, clipped: tensorstore errors embed whole specs."""
  text = str(error).splitlines()[0] if str(error) else ""
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}"


def _file_sizes(step_dir: str) -> dict[str, int]:
  """{path relative to step_dir: size in bytes} of every file under it but the record itself."""
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      if name != FILE_SIZES:
        out[os.path.relpath(path, step_dir)] = os.path.getsize(path)
  return dict(sorted(out.items()))


def _changed_file(step_dir: str) -> str | None:
  """What differs from the step's recorded file sizes; None when they match or none were recorded."""
  record = os.path.join(step_dir, FILE_SIZES)
  if not os.path.exists(record):
    return None
  try:
    with open(record, encoding="utf-8") as f:
      want = json.load(f)
  except ValueError:
    return f"{FILE_SIZES} is unreadable"
  have = _file_sizes(step_dir)
  for name, size in want.items():
    if name not in have:
      return f"{name} is missing"
    if have[name] != size:
      return f"{name} is {have[name]} bytes, {size} when saved"
  return None


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  """Typed PRNG keys -> their uint32 key data, other leaves unchanged."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The abstract uint32 array that `key_data` of an abstract key yields.

  The trailing key-data dimension stays replicated: a PartitionSpec shorter
  than the rank leaves the remaining dimensions unsharded.
  """
  data = jax.eval_shape(jax.random.key_data, x)
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)


def _impl_of(dtype):
  """PRNG implementation of a key dtype, for wrap_key_data.

  jax.random.key_impl wants a concrete key array and abstract leaves are not
  one; the dtype's name is no help either ("key<fry>" is not a valid impl
  name). JAX 0.10 keeps the impl on the dtype as `_impl`.
  """
  return dtype._impl  # pylint: disable=protected-access


def _data_to_keys(restored: Any, abstract: Any) -> Any:
  """Wraps restored key data back into typed keys where `abstract` has keys."""

  def wrap(data, target):
    if not _is_key(target):
      return data
    return jax.random.wrap_key_data(data, impl=_impl_of(target.dtype))

  return jax.tree.map(wrap, restored, abstract)


class Checkpointer:
  """Saves and restores (state, meta) pairs under one directory.

  Saves are asynchronous: `save` returns once device arrays are copied to
  host memory, and the files are written by a background thread while the
  training loop continues. A second `save` first waits for the previous one.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where step directories live, normally DIR/checkpoints.
      max_to_keep: how many of the latest steps to keep; older ones are
        deleted after each successful save.
      async_save: write files in a background thread.
    """
    if max_to_keep < 1:
      raise UserError(f"checkpoint max_to_keep is {max_to_keep}; set config.checkpoint.keep >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        # Removes tmp directories that a crash mid-save left behind.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unrecorded: list[int] = []  # saved steps whose file sizes are not yet recorded

  def _record_sizes(self) -> None:
    """Records the file sizes of the steps saved since the last call; call once saves are final."""
    if jax.process_index() == 0:
      for step in self._unrecorded:
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):  # unless the keep policy deleted it already
          sizes = _file_sizes(step_dir)
          files.write_atomically(os.path.join(step_dir, FILE_SIZES), lambda f, sizes=sizes: json.dump(sizes, f))
    self._unrecorded.clear()

  def all_steps(self) -> list[int]:
    """Steps Orbax lists as finalised (damaged ones included), ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Starts saving `state` and `meta` as `step`; returns before files land.

    Args:
      step: the training step; the caller decides when to save.
      state: pytree of jax arrays (any sharding), typed PRNG keys and
        scalars. Do not donate or delete these buffers until `save` returns.
      meta: JSON-serialisable dict stored beside the arrays.
    """
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      # Fail here, in the training thread, not later in the writer thread.
      raise TypeError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}") from e
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_keys_to_data(state)),
        meta=ocp.args.JsonSave(dict(meta)),
    )
    self._manager.wait_until_finished()  # what Orbax's save does first anyway
    self._record_sizes()
    self._manager.save(step, args=args, force=True)
    self._unrecorded.append(step)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest step that loads cleanly onto the given shardings.

    Args:
      abstract_state: pytree like the saved state whose leaves are
        jax.ShapeDtypeStruct with a `sharding` (jax.eval_shape of the state
        constructor plus shardings). Typed key leaves are restored as keys.

    Returns:
      (step, state, meta), or None when the directory holds no step.

    Raises:
      UserError: steps exist but none can be restored (for example the config
        changed the model shape); nothing is moved aside in that case.
    """
    return self._restore_newest(abstract_state, partial=False)

  def restore_params(self, abstract_params: Any) -> tuple[int, Any] | None:
    """(step, params) of the newest step that restores: the state's `params` field alone.

    For readers of a trained policy (rcfd_jax.export): the optimizer state is
    neither rebuilt nor read. abstract_params is like the saved params, with
    ShapeDtypeStruct leaves carrying shardings. Damaged steps fall back as in
    restore_latest.
    """
    restored = self._restore_newest({"params": abstract_params}, partial=True)
    return None if restored is None else (restored[0], restored[1]["params"])

  def _restore_newest(self, abstract_state: Any, partial: bool) -> tuple[int, Any, dict[str, Any]] | None:
    """restore_latest; with `partial`, only the fields of the state that abstract_state (a dict) names."""
    self.wait_until_finished()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    abstract_data = jax.tree.map(lambda x: _abstract_key_data(x) if _is_key(x) else x, abstract_state)
    damaged = []
    last_error = None
    for step in steps:
      restored, error = self._try_restore(step, abstract_data, partial)
      if error is not None:
        logging.warning(
            "checkpoint step %d in %s is damaged and cannot be restored (%s); falling back to the previous step",
            step, self.directory, error)
        damaged.append(step)
        last_error = error
        continue
      self._move_aside(damaged)
      state = _data_to_keys(restored["state"], abstract_state)
      return step, state, dict(restored["meta"])
    raise UserError(
        f"none of the checkpoint steps {sorted(steps)} in {self.directory} can be restored "
        f"(last error: {last_error}); "
        "if the config changed the model or optimizer, use a new --workdir")

  def _try_restore(self, step: int, abstract_data: Any, partial: bool = False) -> tuple[Any, str | None]:
    """(restored, None), or (None, error text) when any process failed.

    Each process reads only its own shards, so one may hit a damaged file
    that another never opens. CheckpointManager.restore ends in a global
    barrier that a process which raised never reaches, which breaks the
    whole job (seen with two processes: "sync_global_devices name mismatch",
    then the coordination service aborts). So we read through the item
    handlers, which hold no barrier, and then agree on the outcome with
    one allgather: all processes resume from the same step. With `partial`,
    only the fields abstract_data names are read (Orbax's partial restore).
    """
    step_dir = epath.Path(self.directory) / str(step)
    restored, error = None, _changed_file(os.fspath(step_dir))
    if error is None:
      restored, error = self._read(step_dir, abstract_data, partial)
    if jax.process_count() > 1:
      failed = multihost_utils.process_allgather(np.int32(error is not None))
      if error is None and np.any(failed):
        error = "another process could not read its shards of this step"
    return (None, error) if error is not None else (restored, None)

  @staticmethod
  def _read(step_dir: epath.Path, abstract_data: Any, partial: bool) -> tuple[Any, str | None]:
    """(restored, None) or (None, error text): this process's shards of the step, through Orbax."""
    state_handler = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    if partial:
      args = ocp.args.PyTreeRestore(abstract_data, ocp.checkpoint_utils.construct_restore_args(abstract_data),
                                    partial_restore=True)
    else:
      args = ocp.args.StandardRestore(abstract_data)
    try:
      return {
          "state": state_handler.restore(step_dir / "state", args=args),
          "meta": ocp.JsonCheckpointHandler().restore(step_dir / "meta"),
      }, None
    except _DAMAGE_ERRORS as e:
      # Keep text, not the exception: its traceback pins Orbax's abandoned
      # read coroutines (and their buffers) in a reference cycle.
      return None, _short(e)
    finally:
      state_handler.close()

  def _move_aside(self, steps: list[int]) -> None:
    """Renames damaged step directories into DIR/checkpoints/damaged/.

    Keeping them (rather than deleting) leaves evidence to debug with, and
    frees the step numbers the resumed run will save again. The name
    `damaged` is not a number, so Orbax never lists it as a step.
    """
    if not steps:
      return
    if jax.process_index() == 0:
      target_dir = os.path.join(self.directory, DAMAGED_SUBDIR)
      os.makedirs(target_dir, exist_ok=True)
      for step in steps:
        target = os.path.join(target_dir, f"{step}.{time.time_ns()}")
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("moved damaged checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("rcfd_jax.checkpoint.move_aside")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until the last async save is on disk (call before exiting)."""
    self._manager.wait_until_finished()
    self._record_sizes()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    self.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionGuard:
  """Tells the training loop when to save and stop because of SIGTERM.

  Single process: a SIGTERM handler sets `requested`; the loop checks
  `should_stop(step)` each step, saves, and exits cleanly.

  Several processes: every process must save the same step, but SIGTERM may
  reach only some of them. JAX's preemption sync manager (started by
  jax.distributed.initialize when jax_enable_preemption_service is on)
  already catches SIGTERM, agrees on a step across hosts, and answers
  through multihost_utils.reached_preemption_sync_point, which every process
  must call every step; `should_stop` does that. We then install no handler
  of our own, which would replace JAX's.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._flag = threading.Event()
    self._previous: dict[int, Any] = {}
    self._use_sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
    if self._use_sync:
      return
    if threading.current_thread() is not threading.main_thread():
      logging.warning("preemption guard not installed: signal handlers need the main thread")
      return
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    # Only set a flag: the handler runs between bytecodes of the training
    # loop, where saving a checkpoint is not safe.
    logging.warning("received signal %d; will save a checkpoint and stop after this step", signum)
    self._flag.set()

  @property
  def requested(self) -> bool:
    """True once this process received one of the signals.

    Process-local, and never set when JAX's sync manager owns SIGTERM (several
    processes); loops that may run on several hosts use `should_stop`.
    """
    return self._flag.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether to save at `step` and exit; call it every step on every process."""
    if self._use_sync:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    """Restores the signal handlers that were there before."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()


@contextlib.contextmanager
def preemption_guard(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[PreemptionGuard]:
  """Context manager form of PreemptionGuard: handlers live for the block."""
  guard = PreemptionGuard(signals)
  try:
    yield guard
  finally:
    guard.close()
