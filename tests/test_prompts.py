"""Prompts and demonstrations: the paper's prompt constructions, sources, splits and bad inputs."""

import csv
import json
import time

import pytest

from conftest import load_config
from rcfd_jax import prompts
from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import corpus, tiny


@pytest.fixture(scope="module")
def tok():
  return tiny.train_tokenizer(corpus.pretraining_texts(300, seed=5), vocab_size=400)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
  return corpus.write_corpus(tmp_path_factory.mktemp("corpus"), n_reviews=300, seed=0).reviews


def _cfg(path, **kw):
  c = prompts.default_data_config()
  c.path = str(path)
  c.update(kw)
  return c


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def _enc(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


QA = [{"prompt": f"Tell me about film {i}.", "demonstration": f"Film {i} is a quiet drama.",
       "id": i} for i in range(12)]


# ----------------------------------------------------------------------- formats


def test_columns_same_result_from_jsonl_csv_parquet(tmp_path, tok):
  import datasets
  _jsonl(tmp_path / "qa.jsonl", QA)
  with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=["prompt", "demonstration", "id"])
    w.writeheader()
    w.writerows(QA)
  datasets.Dataset.from_list(QA).to_parquet(str(tmp_path / "qa.parquet"))
  got = [prompts.load_prompts(_cfg(tmp_path / f"qa.{ext}", prompt_template="Q: {prompt}\nA:"), tok)
         for ext in ("jsonl", "csv", "parquet")]
  for ds in got:
    assert ds.prompt_texts[3] == "Q: Tell me about film 3.\nA:"
    assert ds.prompt_ids[3] == _enc(tok, "Q: Tell me about film 3.\nA:")
    assert ds.demo_texts[3] == "Film 3 is a quiet drama."
    assert ds.demo_ids[3] == _enc(tok, "Film 3 is a quiet drama.") + [tok.eos_token_id]
    assert ds.extras[3] == {"id": 3}
    assert ds.prompt_ids == got[0].prompt_ids and ds.demo_ids == got[0].demo_ids
  assert len({ds.fingerprint for ds in got}) == 3  # file bytes differ


def test_directory_picks_the_split_files(tmp_path, tok):
  _jsonl(tmp_path / "train.jsonl", QA[:8])
  _jsonl(tmp_path / "validation.jsonl", QA[8:])
  assert len(prompts.load_prompts(_cfg(tmp_path), tok)) == 8
  assert len(prompts.load_prompts(_cfg(tmp_path, split="validation"), tok)) == 4
  with pytest.raises(UserError, match="no split 'test'.*train, validation"):
    prompts.load_prompts(_cfg(tmp_path, split="test"), tok)


def test_continuation_splits_at_exactly_n_tokens_with_label_filter(reviews, tok):
  cfg = _cfg(reviews, format="continuation", label_column="label", label_value="positive",
             prompt_tokens=10, max_prompt_tokens=10, demo_max_tokens=1000)
  ds = prompts.load_prompts(cfg, tok)
  rows = [json.loads(line) for line in reviews.read_text().splitlines()]
  positive = [r for r in rows if r["label"] == "positive"]
  assert len(ds) == len(positive) and all(e["label"] == "positive" for e in ds.extras)
  for i in (0, 7, len(ds) - 1):
    full = _enc(tok, positive[i]["text"])
    assert len(ds.prompt_ids[i]) == 10 and ds.prompt_ids[i] == full[:10]
    assert ds.demo_ids[i] == full[10:] + [tok.eos_token_id]
    assert ds.prompt_texts[i] + ds.demo_texts[i] == positive[i]["text"]


def _bos_tokenizer():
  """A word-level tokenizer that adds BOS to every encoding, as Llama's does."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  words = ["<pad>", "<s>", "</s>", "<unk>"] + "a the film was good bad very long story".split()
  t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>")


def test_continuation_prompt_keeps_its_first_token_under_a_tokenizer_that_adds_bos(tmp_path):
  bos = _bos_tokenizer()
  text = "the film was very good a long story"
  path = _jsonl(tmp_path / "r.jsonl", [{"text": text}] * 3)
  with pytest.raises(UserError, match=r"max_prompt_tokens=4 cannot hold .*prompt_tokens=4 text tokens "
                                      r"plus 1 the policy tokenizer adds \(<s>\); set "
                                      r"data.max_prompt_tokens=5"):
    prompts.load_prompts(_cfg(path, format="continuation", prompt_tokens=4, max_prompt_tokens=4), bos)
  ds = prompts.load_prompts(_cfg(path, format="continuation", prompt_tokens=4, max_prompt_tokens=5), bos)
  assert ds.prompt_ids[0] == [bos.bos_token_id] + _enc(bos, "the film was very")
  assert ds.prompt_texts[0] == "the film was very"
  assert ds.demo_ids[0] == _enc(bos, "good a long story") + [bos.eos_token_id]


def test_presets_leave_room_for_bos():
  for name in ("imdb", "wiki_seqll"):
    c = load_config(name).data
    assert c.max_prompt_tokens == c.prompt_tokens + 1, name


def test_continuation_truncates_demonstration_and_appends_eos(reviews, tok):
  ds = prompts.load_prompts(_cfg(reviews, format="continuation", prompt_tokens=4,
                              max_prompt_tokens=8, demo_max_tokens=6), tok)
  assert all(len(d) <= 6 and d[-1] == tok.eos_token_id for d in ds.demo_ids)
  assert ds.demo_ids[0][:-1] == _enc(tok, ds.demo_texts[0])
  assert len(ds) == 300  # no label filter


def test_tldr_confidence_filter_chosen_summary_and_template(tmp_path, tok):
  def row(i, confidence, choice=1, post="My cat keeps waking me up at night."):
    return {"info": {"id": f"p{i}", "post": post, "title": "cat", "subreddit": "pets"},
            "summaries": [{"text": f" bad summary {i}"}, {"text": f" cat wakes me {i}"}],
            "choice": choice, "extra": {"confidence": confidence}, "worker": "w"}
  rows = [row(0, 9), row(1, 5, choice=0), row(2, 4), row(3, None), row(4, 7, post=None),
          row(5, 6)]
  path = _jsonl(tmp_path / "comparisons.jsonl", rows)
  ds = prompts.load_prompts(_cfg(path, format="tldr", prompt_template="Summarize: {prompt}",
                              max_prompt_tokens=64), tok)
  assert ds.demo_texts == [" cat wakes me 0", " bad summary 1", " cat wakes me 5"]
  assert ds.prompt_texts[0] == "Summarize: My cat keeps waking me up at night."
  assert ds.prompt_ids[0] == _enc(tok, ds.prompt_texts[0])
  assert ds.extras[0]["info"] == {"id": "p0", "title": "cat", "subreddit": "pets"}
  assert ds.extras[0]["worker"] == "w" and "summaries" not in ds.extras[0]
  lenient = prompts.load_prompts(_cfg(path, format="tldr", min_confidence=1), tok)
  assert len(lenient) == 4  # still no row without confidence or without a post


def test_prompt_overflow_truncate_keeps_template_and_end_drop_and_error(tmp_path, tok):
  long = " ".join(["word"] * 80)
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": long, "demonstration": "ok"},
                                       {"prompt": "short", "demonstration": "ok"}])
  kw = dict(prompt_template="Summarize: {prompt} TL;DR:", max_prompt_tokens=40)
  ds = prompts.load_prompts(_cfg(path, prompt_overflow="truncate", **kw), tok)
  assert len(ds.prompt_ids[0]) == 40
  head, tail = _enc(tok, "Summarize: "), _enc(tok, " TL;DR:")
  assert ds.prompt_ids[0][:len(head)] == head and ds.prompt_ids[0][-len(tail):] == tail
  assert ds.prompt_texts[0].startswith("Summarize: ") and ds.prompt_texts[0].endswith("word TL;DR:")
  assert len(prompts.load_prompts(_cfg(path, prompt_overflow="drop", **kw), tok)) == 1
  with pytest.raises(UserError, match="row 0: the prompt has .*max_prompt_tokens=40"):
    prompts.load_prompts(_cfg(path, prompt_overflow="error", **kw), tok)
  with pytest.raises(UserError, match="template alone"):
    prompts.load_prompts(_cfg(path, prompt_template="Summarize " * 20 + "{prompt}",
                           max_prompt_tokens=16), tok)


def test_max_examples_and_fingerprint(tmp_path, reviews, tok):
  cfg = _cfg(reviews, format="continuation", max_examples=50)
  a, b = prompts.load_prompts(cfg, tok), prompts.load_prompts(cfg, tok)
  assert len(a) == 50 and a.fingerprint == b.fingerprint
  from transformers import AutoTokenizer
  tok.save_pretrained(tmp_path / "tok")  # the cache key survives a save and reload
  assert prompts.load_prompts(cfg, AutoTokenizer.from_pretrained(tmp_path / "tok")).fingerprint \
      == a.fingerprint
  other_tok = tiny.train_tokenizer(corpus.pretraining_texts(100, seed=9), vocab_size=300)
  assert prompts.load_prompts(cfg, other_tok).fingerprint != a.fingerprint
  assert prompts.load_prompts(_cfg(reviews, format="continuation", max_examples=50,
                                demo_max_tokens=30), tok).fingerprint != a.fingerprint
  copy = tmp_path / "copy.jsonl"
  copy.write_bytes(reviews.read_bytes())
  assert prompts.load_prompts(_cfg(copy, format="continuation", max_examples=50),
                           tok).fingerprint == a.fingerprint  # content, not path
  copy.write_bytes(reviews.read_bytes() + b'{"text": "one more review here", "label": "x"}\n')
  assert prompts.load_prompts(_cfg(copy, format="continuation", max_examples=50),
                           tok).fingerprint != a.fingerprint


# ------------------------------------------------------------------------- split


def test_split_deterministic_disjoint_and_grouped_by_prompt(tmp_path, tok):
  rows = QA + [{"prompt": QA[0]["prompt"], "demonstration": "Another answer.", "id": 99}]
  cfg = _cfg(_jsonl(tmp_path / "qa.jsonl", rows), validation_size=4, shuffle_seed=1)
  ds = prompts.load_prompts(cfg, tok)
  s1, s2 = prompts.split(ds, cfg), prompts.split(ds, cfg)
  assert s1.validation.prompt_texts == s2.validation.prompt_texts
  assert s1.train.fingerprint == s2.train.fingerprint != s1.validation.fingerprint
  assert not set(s1.train.prompt_texts) & set(s1.validation.prompt_texts)
  assert len(s1.train) + len(s1.validation) == len(ds) and len(s1.validation) >= 4
  cfg.shuffle_seed = 2
  assert prompts.split(ds, cfg).validation.prompt_texts != s1.validation.prompt_texts
  cfg.validation_size, cfg.validation_fraction = 0, 0.5
  assert len(prompts.load(cfg, tok).validation) in (6, 7)
  cfg.validation_size = len(ds)
  with pytest.raises(UserError, match="leave some for training"):
    prompts.split(ds, cfg)


# ------------------------------------------------------------------------ errors


def test_missing_file(tmp_path, tok):
  with pytest.raises(UserError, match="does not exist"):
    prompts.load_prompts(_cfg(tmp_path / "nope.jsonl"), tok)


def test_missing_column_names_available_ones(tmp_path, tok):
  path = _jsonl(tmp_path / "qa.jsonl", QA)
  with pytest.raises(UserError, match="'answer' is not in .*available columns: prompt, "
                                      "demonstration, id"):
    prompts.load_prompts(_cfg(path, demo_column="answer"), tok)
  with pytest.raises(UserError, match="'stars'"):
    prompts.load_prompts(_cfg(path, label_column="stars", label_value="5"), tok)


def test_empty_after_filtering_names_only_the_filters_the_config_sets(reviews, tmp_path, tok):
  with pytest.raises(UserError, match="no examples left") as e:
    prompts.load_prompts(_cfg(reviews, format="continuation", label_column="label",
                           label_value="lukewarm"), tok)
  assert "'label' == 'lukewarm'" in str(e.value) and "prompt_tokens=10" in str(e.value)
  assert "confidence" not in str(e.value) and "format=" not in str(e.value)
  path = _jsonl(tmp_path / "qa.jsonl", [dict(r, kind="qa") for r in QA])
  with pytest.raises(UserError, match=r"after filtering \(data.label_column 'kind' == 'chat'\);") as e:
    prompts.load_prompts(_cfg(path, label_column="kind", label_value="chat"), tok)


def test_empty_demonstration(tmp_path, tok):
  path = _jsonl(tmp_path / "qa.jsonl", QA[:3] + [{"prompt": "Hi", "demonstration": "  "}])
  with pytest.raises(UserError, match="row 3: the demonstration is empty"):
    prompts.load_prompts(_cfg(path), tok)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_non_utf8(tmp_path, tok, ext):
  path = tmp_path / f"latin1.{ext}"
  body = ('{"prompt": "caf\u00e9", "demonstration": "ok"}\n' if ext == "jsonl"
          else "prompt,demonstration\nok,ok\ncaf\u00e9,ok\n")
  path.write_bytes(body.encode("latin-1"))
  with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xe9 on line \d\)"):
    prompts.load_prompts(_cfg(path), tok)


def test_bad_config_values(tmp_path, tok):
  path = _jsonl(tmp_path / "qa.jsonl", QA)
  with pytest.raises(UserError, match="data.format must be one of"):
    prompts.load_prompts(_cfg(path, format="chat"), tok)
  with pytest.raises(UserError, match="must contain '\\{prompt\\}'"):
    prompts.load_prompts(_cfg(path, prompt_template="Summarize:"), tok)


def test_hub_id_offline_fails_fast(tok, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.perf_counter()
  with pytest.raises(UserError, match="hub dataset id.*offline.*local"):
    prompts.load_prompts(_cfg("openai/summarize_from_feedback", format="tldr",
                           hub_config="comparisons"), tok)
  assert time.perf_counter() - start < 5


def _tldr_rows():
  """Rows as the hub's parquet conversion of openai/summarize_from_feedback (comparisons) holds them."""
  return [{"info": {"id": f"p{i}", "post": f"My cat keeps waking me up, night {i}.", "title": "cat",
                    "subreddit": "pets", "site": None, "article": None},
           "summaries": [{"text": f" bad summary {i}", "policy": "a", "note": None},
                         {"text": f" cat wakes me {i}", "policy": "b", "note": None}],
           "choice": 1, "worker": "w", "batch": "b0", "split": "train",
           "extra": {"confidence": 5 + i % 3}} for i in range(6)]


@pytest.fixture
def script_only_hub(monkeypatch):
  """A stand-in hub where the dataset ships a loading script; the parquet branch holds the rows."""
  import datasets
  calls = []

  def load_dataset(path, name=None, split=None, revision=None, **kw):
    calls.append((path, name, split, revision))
    if revision != "refs/convert/parquet":
      raise RuntimeError("Dataset scripts are no longer supported, but found summarize_from_feedback.py")
    if name != "comparisons":
      raise ValueError(f"BuilderConfig '{name}' not found")
    return datasets.Dataset.from_list(_tldr_rows())

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  monkeypatch.setattr(datasets, "get_dataset_config_names", lambda path, revision=None: ["axis", "comparisons"])
  return calls


def test_hub_dataset_with_a_loading_script_reads_the_parquet_conversion(script_only_hub, tok, caplog):
  cfg = _cfg("openai/summarize_from_feedback", format="tldr", hub_config="comparisons",
             prompt_template="Summarize: {prompt}", max_prompt_tokens=64)
  with caplog.at_level("WARNING"):
    ds = prompts.load_prompts(cfg, tok)
  assert script_only_hub[-1] == ("openai/summarize_from_feedback", "comparisons", "train",
                                 "refs/convert/parquet")
  assert ds.demo_texts == [f" cat wakes me {i}" for i in range(6)]
  assert ds.prompt_texts[0] == "Summarize: My cat keeps waking me up, night 0."
  said = [r.getMessage() for r in caplog.records if "refs/convert/parquet" in r.getMessage()]
  assert len(said) == 1 and "loading script" in said[0] and "config comparisons" in said[0]


def test_hub_dataset_with_a_loading_script_fails_in_one_line_naming_the_revision(script_only_hub, tok):
  cfg = _cfg("openai/summarize_from_feedback", format="tldr", hub_config="")
  with pytest.raises(UserError, match=r"parquet conversion \(revision refs/convert/parquet\) has no "
                                      r"config '' but axis, comparisons; set data.hub_config"):
    prompts.load_prompts(cfg, tok)


def test_tldr_rows_without_the_fields_it_reads(tmp_path, tok):
  rows = [dict(r, extra={"score": 1}) for r in _tldr_rows()]
  with pytest.raises(UserError, match=r"the tldr format reads extra.confidence, which the rows"):
    prompts.load_prompts(_cfg(_jsonl(tmp_path / "c.jsonl", rows), format="tldr"), tok)
