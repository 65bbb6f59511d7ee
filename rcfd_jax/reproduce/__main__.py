"""python -m rcfd_jax.reproduce --workdir=DIR [--quick] [--parallel=N] [--seeds=S]: see run.py."""

import sys
from pathlib import Path

from absl import app, flags, logging

from rcfd_jax.errors import exit_on_user_error
from rcfd_jax.reproduce import run, runner


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  if f.serve:  # a worker of the command: runs the jobs named on stdin (runner.Workers)
    sys.exit(runner.serve(Path(f.workdir), lambda name: run.run_job(name, Path(f.workdir), f.quick, f.seeds)))
  if f.job:  # a child of the command: one stage or arm (JAX_COMPILATION_CACHE_DIR set by the parent)
    exit_on_user_error(run.run_job)(f.job, Path(f.workdir), f.quick, f.seeds)
  else:
    exit_on_user_error(run.reproduce)(f.workdir, f.quick, f.parallel, f.seeds)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Directory for assets, runs and results.")
  flags.DEFINE_bool("quick", False, "Tiny corpora and few steps: checks the plumbing, numbers mean nothing.")
  flags.DEFINE_integer("parallel", 2, "Stages and arms run at once, in as many worker processes.")
  flags.DEFINE_integer("seeds", 1, "Seeds of the rcfd and rcfd_group arms: 1 runs seed 0 only, 3 adds seeds 1 and 2.")
  flags.DEFINE_string("job", "", "Run one stage (REGIME/STAGE) or arm (TASK/ARM) in this process, "
                      "with JAX_COMPILATION_CACHE_DIR=DIR/jax_cache to share the command's compiled programs.")
  flags.DEFINE_bool("serve", False, "Be one of the command's worker processes: run the stages and arms named "
                    "on stdin, one per line (the command starts these itself).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
