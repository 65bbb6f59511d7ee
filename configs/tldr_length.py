"""Use case 3: two rewards, the TL;DR RM score and R_length = -|y| (paper section 5.3).

    python -m rcfd_jax.main --config=configs/tldr_length.py --workdir=DIR
    python -m rcfd_jax.main --config=configs/tldr_length.py --workdir=DIR \
        --config.rl.objective=weighted --config.rl.alpha='(1.0, 0.005)'

RCfD calibrates each reward to the demonstration's, whitens each, then sums.
The baseline R_alpha = R_RM + alpha * R_length needs a sweep of alpha
(0..0.01). Paper, R_RM / length / A: demonstrations 4.14 / 40.2 / -;
alpha*=0.005: 4.68 / 50.2 / 0.46; RCfD: 4.23 / 39.4 / 0.39.
"""

from pathlib import Path

from rcfd_jax import config as base

tldr = base.load_file(Path(__file__).with_name("tldr.py"))  # beside this file, in a checkout or installed


def get_config(arg=None):
  c = tldr.get_config(arg)
  c.reward.sources = ("classifier", "length")
  c.rl.alpha = (1.0, 0.005)
  return c
