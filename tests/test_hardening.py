"""Hardening (issue #8): bad input, faults and untrusted files, with nothing lost.

docs/hardening.md lists every case as input -> message -> test; the cases
other modules already cover (tests/test_train.py, test_prompts.py, test_batching.py,
test_models_io.py, test_checkpoint.py, test_step.py, test_configs.py) are
referenced there, not repeated here.

Cost: the bad-input cases fail before anything compiles. The fault cases are
three command-line runs in one workdir that share a persistent XLA cache:
  A  SIGKILL right after the step-4 save starts (mid async checkpoint write);
  B  the rerun resumes from step 2, then the disk "fills" as step 4 is saved
     (RLIMIT_FSIZE: every write that grows a file fails, root included): one
     error line, exit 2, checkpoint 2 intact;
  C  a plain rerun resumes from step 2 again and finishes; nothing was written
     outside --workdir and the demonstration-reward cache.
benchmarks/kill_resume.py kills at ten points and compares parameters; it is
too slow for CI.
"""

import ast
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rcfd_jax import config as config_lib, rewards, train
from rcfd_jax.policy import load_tokenizer
from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import tiny

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import cli_args, main_cmd, read_metrics, tiny_config  # noqa: E402  (shared helpers)


def _one_error_line(proc):
  """The single `error:` line of a failed command; library logs may precede it."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
  return errors[0]


# --------------------------------------------------------------------- bad config files


@pytest.mark.parametrize("body,expect", [
    ("def get_config(:\n  pass\n", "SyntaxError: invalid syntax"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
    ("def get_config():\n  return undefined_name\n", "NameError"),
    ("def get_config():\n  return 3\n", "returned int, not a ConfigDict"),
])
def test_config_file_that_fails_to_load_is_one_error_line(body, expect, tmp_path, env):
  bad = tmp_path / "bad_config.py"
  bad.write_text(body)
  wd = tmp_path / "run"
  proc = subprocess.run(main_cmd([f"--config={bad}", f"--workdir={wd}"]), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  line = _one_error_line(proc)
  assert expect in line and "Traceback" not in proc.stderr, proc.stderr
  assert not wd.exists()


# ------------------------------------------------- bad input the trainer refuses before compiling


def _refused(config, wd, cache, match):
  with pytest.raises(UserError, match=match):
    train.run(config, str(wd))
  assert not wd.exists(), "a refused run must leave no workdir behind"
  assert not Path(cache).exists() or not list(Path(cache).iterdir()), "nor a demo-reward cache entry"


def test_mesh_that_does_not_match_the_devices(tiny_assets, tmp_path):
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"mesh.shape": (3, 1, 1)})
  _refused(c, tmp_path / "run", tmp_path / "cache", r"mesh shape \(3, 1, 1\) needs 3 devices but 8 are visible")


def _policy_copy(tiny_assets, tmp_path, **tokenizer_config):
  d = tmp_path / "policy"
  shutil.copytree(Path(tiny_assets) / "policy", d)
  f = d / "tokenizer_config.json"
  cfg = json.loads(f.read_text())
  cfg.update(tokenizer_config)
  f.write_text(json.dumps(cfg))
  return d


def test_policy_tokenizer_without_eos(tiny_assets, tmp_path):
  d = _policy_copy(tiny_assets, tmp_path, eos_token=None)
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"policy.path": str(d)})
  _refused(c, tmp_path / "run", tmp_path / "cache", "has no eos token; set eos_token in its tokenizer_config.json")


def test_policy_directory_with_only_a_pickle_and_no_tokenizer_is_named_before_the_data(tiny_assets, tmp_path):
  d = tmp_path / "policy"
  d.mkdir()
  shutil.copy(Path(tiny_assets) / "policy" / "config.json", d)
  (d / "pytorch_model.bin").write_bytes(b"a pickle is never opened")
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"policy.path": str(d)})
  _refused(c, tmp_path / "run", tmp_path / "cache",
           r"policy holds only pickle checkpoints \(pytorch_model.bin\).*convert them to safetensors.*"
           r"; and it has no tokenizer files \(tokenizer.json, .*\): save its tokenizer into it")
  shutil.copy(Path(tiny_assets) / "policy" / "model.safetensors", d)
  _refused(c, tmp_path / "run", tmp_path / "cache", r"policy has no tokenizer files")


def test_policy_tokenizer_without_pad_pads_with_eos(tiny_assets, tmp_path):
  tok = load_tokenizer(str(_policy_copy(tiny_assets, tmp_path, pad_token=None)))
  assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"


def test_prompt_plus_budget_longer_than_the_context(tiny_assets, tmp_path):
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"data.max_prompt_tokens": 250})
  _refused(c, tmp_path / "run", tmp_path / "cache", "exceeds the policy's context 256")


def test_weights_that_do_not_match_the_config(tiny_assets, tmp_path):
  d = tmp_path / "policy"
  shutil.copytree(Path(tiny_assets) / "policy", d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, n_embd=2 * cfg["n_embd"])))
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"policy.path": str(d)})
  _refused(c, tmp_path / "run", tmp_path / "cache", "the weights do not belong to this config")


def _foreign_rm(tmp_path, pad=True):
  """A GPT-2 classifier whose word-level vocabulary is Cyrillic: English reads as <unk>."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ["<pad>", "<eos>", "<unk>"] + "фильм хороший плохой очень скучный".split()
  t = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  special = dict(pad_token="<pad>") if pad else {}
  tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>", **special)
  cfg = tiny.gpt2_config(len(words), n_embd=16, n_layer=1, num_labels=2)
  return tiny.write_model_dir(tmp_path / "foreign_rm", cfg, tok)


def test_reward_model_that_cannot_read_the_text(tiny_assets, tmp_path):
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"reward.classifier.path": str(_foreign_rm(tmp_path))})
  _refused(c, tmp_path / "run", tmp_path / "cache",
           r"reads 100% of the prompt and demonstration tokens as unknown \(<unk>\).*trained on this language")


def test_reward_model_tokenizer_without_pad_pads_with_eos(tiny_assets, tmp_path):
  policy_tok = load_tokenizer(str(Path(tiny_assets) / "policy"))
  cfg = tiny_config(tiny_assets, tmp_path).reward.classifier
  cfg.path = str(_foreign_rm(tmp_path, pad=False))
  rm = rewards.load_classifier(cfg, policy_tok, mesh=None)
  assert rm.tokenizer.pad_token == "<eos>" and not rm.in_graph
  ids, mask = rm.encode(["фильм"], [" очень хороший"])  # the bridge pads without raising
  assert ids.shape == mask.shape == (1, cfg.max_tokens) and mask.any()
  rm.check_reads(["фильм очень хороший"])  # its own language passes


def test_demonstrations_longer_than_the_budget_warn(caplog):
  c = tiny_config("build/tiny", "/nonexistent", **{"rollout.max_new_tokens": 8, "data.demo_max_tokens": 24})
  with caplog.at_level("WARNING"):
    config_lib.check(c)
  assert any("longer than the generation budget" in r.getMessage() for r in caplog.records)
  caplog.clear()
  c.data.demo_max_tokens = 9  # 8 tokens + EOS against completions of 7 tokens + EOS: one too long
  with caplog.at_level("WARNING"):
    config_lib.check(c)
  assert any("longer than the generation budget" in r.getMessage() for r in caplog.records)
  caplog.clear()
  c.data.demo_max_tokens = 8  # 7 tokens + EOS: exactly the budget
  with caplog.at_level("WARNING"):
    config_lib.check(c)
  assert not any("generation budget" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rows,match", [
    ([{"prompt": "", "demonstration": "fine"}], "row 0: the prompt is empty"),
    ([{"prompt": None, "demonstration": "fine"}], "row 0: the prompt is empty"),
    ([{"prompt": 7, "demonstration": "fine"}], "column 'prompt' row 0 holds int, not text"),
])
def test_dataset_rows_without_text(rows, match, tiny_assets, tmp_path):
  from rcfd_jax import prompts
  f = tmp_path / "d.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
  c = prompts.default_data_config()
  c.path = str(f)
  with pytest.raises(UserError, match=match):
    prompts.load_prompts(c, load_tokenizer(str(Path(tiny_assets) / "policy")))


def test_dataset_line_that_is_not_json(tiny_assets, tmp_path):
  from rcfd_jax import prompts
  f = tmp_path / "d.jsonl"
  f.write_text('{"prompt": "a", "demonstration": "b"}\n{"prompt": "a", "demonstr\n')
  c = prompts.default_data_config()
  c.path = str(f)
  with pytest.raises(UserError, match="could not be read as json.*check the file format"):
    prompts.load_prompts(c, load_tokenizer(str(Path(tiny_assets) / "policy")))


# --------------------------------------------------------------------------- untrusted files

_UNSAFE_CALLS = {"load", "loads", "Unpickler"}
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "torch"}


def test_package_reads_no_pickle_and_runs_no_remote_code():
  """Only safetensors, JSON and Orbax are read; nothing unpickles or runs downloaded code."""
  problems = []
  for f in sorted((REPO / "rcfd_jax").rglob("*.py")):
    tree = ast.parse(f.read_text(), str(f))
    for node in ast.walk(tree):
      where = f"{f.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        problems += [f"{where} imports {n}" for n in names if n.split(".")[0] in _UNSAFE_MODULES]
      if isinstance(node, ast.Call):
        for kw in node.keywords:
          if kw.arg in ("allow_pickle", "trust_remote_code", "weights_only") and not (
              isinstance(kw.value, ast.Constant) and kw.value.value is (kw.arg == "weights_only")):
            problems.append(f"{where} passes {kw.arg}={ast.unparse(kw.value)}")
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in _UNSAFE_CALLS and isinstance(fn.value, ast.Name) \
            and fn.value.id in _UNSAFE_MODULES | {"np", "numpy", "yaml"}:
          if not (fn.value.id in ("np", "numpy") and any(
              kw.arg == "allow_pickle" for kw in node.keywords)):
            problems.append(f"{where} calls {fn.value.id}.{fn.attr}")
        if isinstance(fn, ast.Name) and fn.id in ("eval", "exec"):
          problems.append(f"{where} calls {fn.id}")
  assert not problems, problems


def test_config_fields_that_name_paths_are_known():
  """Only reward.cache_dir and assets_dir are written outside --workdir; a new output path must be reviewed here."""
  c = config_lib.base()
  paths = set()

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(v, prefix + k + ".")
      elif re.search(r"(path|dir|file)$", k):
        paths.add(prefix + k)

  walk(c, "")
  read_only = {"policy.path", "data.path", "reward.classifier.path"}
  assert paths == read_only | {"reward.cache_dir", "assets_dir"}, paths


# -------------------------------------------------------------------------------- faults

# Runs main with a fault injected by the FAULT environment variable, no hook in the trainer:
#   kill_mid_save  SIGKILL as soon as the step-4 save has started (Orbax writes in a thread);
#   disk_full      from the step-4 save on, every write that grows a file fails (checkpoint, eval, metrics).
_FAULT = textwrap.dedent("""
    import os, resource, signal, sys
    from rcfd_jax import checkpoint, main, metrics
    fault = os.environ["FAULT"]
    if fault == "kill_mid_save":
      save = checkpoint.Checkpointer.save
      def save_then_die(self, step, state, meta):
        save(self, step, state, meta)
        if step == 4:
          os.kill(os.getpid(), signal.SIGKILL)
      checkpoint.Checkpointer.save = save_then_die
    elif fault == "disk_full":
      save = checkpoint.Checkpointer.save
      def fill_then_save(self, step, state, meta):
        if step == 4:
          signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
          resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        save(self, step, state, meta)
      checkpoint.Checkpointer.save = fill_then_save
    from absl import app
    parsed = main.parse_flags(["rcfd_jax.main"] + sys.argv[1:])
    app.run(main.main, flags_parser=lambda _: parsed)
""")


def _tree(root):
  return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def test_kill_mid_save_then_full_disk_then_resume(tiny_assets, env, tmp_path):
  """Nothing is lost or corrupted by a kill mid-save or a full disk; writes stay in workdir and cache."""
  box = tmp_path / "box"  # HOME and cwd of the runs: anything written outside wd and cache lands here
  home, cwd, wd, cache = box / "home", box / "cwd", box / "wd", box / "cache"
  home.mkdir(parents=True)
  cwd.mkdir()
  # Library caches have their own settings (docs/hardening.md): HF datasets' Arrow cache, matplotlib's.
  run_env = dict(env, HOME=str(home), TMPDIR=str(box / "tmp"), MPLCONFIGDIR=str(tmp_path / "mpl"),
                 HF_HOME=str(tmp_path / "hf_home"))
  (box / "tmp").mkdir()
  args = cli_args(tiny_assets, cache, wd)

  def run(fault):
    fault_env = dict(run_env, FAULT=fault)
    if fault == "disk_full":  # its 1-byte file limit would leave 1-byte entries in the XLA cache others read
      fault_env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-c", _FAULT, *args], env=fault_env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)

  a = run("kill_mid_save")
  assert a.returncode == -signal.SIGKILL, a.stderr[-3000:]
  assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3, 4]
  assert not (wd / "checkpoints" / "4").exists()  # at most an Orbax tmp dir, never a complete-looking step

  b = run("disk_full")
  line = _one_error_line(b)
  assert "resumed from step 2" in b.stderr
  assert re.search(r"writing under .* failed \(File too large.*\); free space or make it writable, then rerun "
                   r"the same command: it resumes from checkpoint step 2", line), line
  assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3, 4]  # whole lines only; 4 is replayed on resume
  assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]

  c = run("none")
  assert c.returncode == 0, c.stderr[-3000:]
  assert "resumed from step 2" in c.stderr
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert (wd / "eval" / "step_4.json").is_file()
  assert (_tree(home), _tree(cwd), _tree(box / "tmp")) == ([], [], [])
  assert sorted(p.name for p in box.iterdir()) == ["cache", "cwd", "home", "tmp", "wd"]
