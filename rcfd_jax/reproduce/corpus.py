"""A synthetic movie-review corpus, generated from a seed, for CPU reproductions.

The paper's IMDB use case needs three things from its data: text varied enough
that a tiny LM trained on it writes varied text (so that reward
over-optimization shows up as a loss of variety), a sentiment label a small
classifier can learn, and a sentiment that is graded rather than binary (so
the classifier's logit on the demonstrations has a spread, and calibrating to
it means something). Downloading IMDB is not an option offline, so this module
writes such a corpus from a small compositional grammar.

Each review draws a latent sentiment `mu`; each opinion sentence aims at
`mu` plus noise and picks an adjective of the nearest polarity, possibly
softened or strengthened by an intensifier, or negated; plot and neutral
sentences carry no sentiment. The review's score is the mean polarity of its
opinion sentences and its label follows from the score, so label and text
never disagree. Randomness comes from one seeded numpy generator read in
blocks, which keeps 20k reviews well under a second and the output
byte-identical for a seed.

That is the "plain" regime: its opening (a prompt of a few tokens) says little
of what follows. The "voiced" regime writes reviews as people post them: a
star rating and a one-line title first, in the reviewer's voice (a register:
terse, plain or elaborate; and an intensity: mild, even or strong), then a
body that keeps that verdict and voice (docs/reproduce.md, "The second regime").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

# Adjectives by polarity level; a sentence aiming at polarity p picks level round(p).
ADJECTIVES = {
    3: ("masterful", "breathtaking", "brilliant", "superb", "stunning", "magnificent",
        "extraordinary", "unforgettable", "wonderful", "outstanding", "remarkable", "dazzling"),
    2: ("moving", "delightful", "engaging", "charming", "gripping", "beautiful", "clever",
        "memorable", "heartfelt", "compelling", "witty", "touching", "impressive", "thrilling"),
    1: ("pleasant", "decent", "solid", "enjoyable", "likable", "watchable", "competent", "fun",
        "sweet", "agreeable", "amusing", "harmless", "respectable"),
    -1: ("uneven", "forgettable", "predictable", "flat", "slow", "bland", "mediocre", "clumsy",
         "overlong", "thin", "routine", "uninspired", "muddled"),
    -2: ("boring", "dull", "tedious", "weak", "shallow", "messy", "lifeless", "silly",
         "confusing", "pointless", "lazy", "bad", "irritating"),
    -3: ("awful", "terrible", "dreadful", "horrible", "painful", "unwatchable", "atrocious",
         "abysmal", "embarrassing", "disastrous", "insufferable", "hopeless"),
}
# (word, multiplier on the adjective's polarity); "" means no intensifier.
INTENSIFIERS = (("", 1.0), ("", 1.0), ("", 1.0), ("very", 1.3), ("truly", 1.3),
                ("incredibly", 1.5), ("extremely", 1.6), ("quite", 1.1), ("rather", 0.9),
                ("somewhat", 0.6), ("fairly", 0.8), ("a little", 0.5), ("slightly", 0.5),
                ("genuinely", 1.2), ("really", 1.3), ("pretty", 0.9))
# Negations flip and damp: "not bad" is mildly good, "not brilliant" mildly poor.
NEGATIONS = (("not", -0.5), ("hardly", -0.6), ("never", -0.6), ("not at all", -0.8))
ASPECTS = ("the acting", "the script", "the score", "the cinematography", "the pacing",
           "the dialogue", "the ending", "the editing", "the soundtrack", "the direction",
           "the special effects", "the cast", "the story", "the plot", "the characters",
           "the costumes", "the camera work", "the humor", "the first act", "the final scene",
           "the villain", "the romance", "the action scenes", "the lighting", "the set design",
           "the music", "the twist", "the middle section", "the opening scene", "the makeup")
GENRES = ("thriller", "comedy", "drama", "horror film", "western", "romance", "documentary",
          "musical", "science fiction film", "war film", "mystery", "animated film",
          "crime drama", "family film", "fantasy epic", "road movie", "heist film",
          "period piece", "spy film", "coming of age story", "satire", "disaster movie")
TITLE_FIRST = ("The", "A", "Last", "Silent", "Broken", "Midnight", "Golden", "Lost", "Red",
               "Distant", "Hidden", "Burning", "Frozen", "Little", "Dark", "Wild", "Quiet",
               "Electric", "Paper", "Iron")
TITLE_SECOND = ("River", "Summer", "City", "Garden", "Horizon", "Train", "House", "Kingdom",
                "Moon", "Harbor", "Letters", "Road", "Storm", "Island", "Mirror", "Orchard",
                "Station", "Winter", "Crown", "Forest", "Heart", "Empire", "Valley", "Echo")
FIRST_NAMES = ("Anna", "James", "Maria", "Tom", "Lucy", "David", "Sofia", "Peter", "Emma",
               "Daniel", "Clara", "Henry", "Grace", "Oliver", "Nina", "Samuel", "Julia",
               "Victor", "Helen", "Marcus", "Rosa", "Arthur", "Mei", "Ivan", "Leila", "Paul")
LAST_NAMES = ("Carter", "Moreau", "Hughes", "Silva", "Novak", "Bennett", "Okafor", "Lindqvist",
              "Reyes", "Fischer", "Tanaka", "Walsh", "Duval", "Kowalski", "Harper", "Rossi",
              "Brennan", "Castillo", "Weber", "Nakamura", "Quinn", "Adeyemi", "Sorensen")
PROFESSIONS = ("detective", "teacher", "nurse", "soldier", "pilot", "farmer", "journalist",
               "painter", "lawyer", "chef", "scientist", "musician", "thief", "priest",
               "boxer", "sailor", "librarian", "doctor", "widow", "student", "mechanic", "spy")
AGES = ("young", "retired", "aging", "teenage", "middle-aged", "lonely", "ambitious",
        "grieving", "reckless", "shy")
PLACES = ("a small town", "Paris", "the desert", "a crowded city", "a remote island",
          "the mountains", "a fishing village", "New York", "a space station", "the suburbs",
          "a boarding school", "a sinking ship", "postwar Berlin", "a quiet farm",
          "a border town", "an old hotel", "the jungle", "a coal mine", "Tokyo")
PLOT_VERBS = ("searches for", "tries to protect", "falls in love with", "runs away from",
              "investigates", "must rescue", "slowly uncovers", "plans to steal",
              "is haunted by", "returns home to face", "fights to save", "learns the truth about",
              "makes a deal with", "takes care of", "hides from")
PLOT_OBJECTS = ("a missing sister", "an old friend", "a stolen painting", "a family secret",
                "a dying father", "a mysterious stranger", "a lost letter", "a corrupt mayor",
                "a childhood enemy", "a hidden fortune", "a strange signal", "a runaway child",
                "a forgotten crime", "a rival gang", "a wounded dog", "the last survivor")
PLOT_TIMES = ("over one long night", "during the war", "after a terrible accident",
              "before the winter comes", "in the summer of 1968", "over three decades",
              "on the eve of a wedding", "while the storm rages", "after losing everything")
COMPANY = ("my wife", "my husband", "a friend", "my kids", "my parents", "some coworkers",
           "my sister", "my brother", "a big group", "my roommate", "my grandmother")
WHEN = ("last night", "on Sunday", "over the weekend", "on a plane", "at a festival",
        "on opening night", "at a late screening", "years ago", "on a rainy afternoon")
SOURCES = ("novel", "true story", "short story", "play", "comic book", "video game",
           "newspaper article", "memoir", "fairy tale")
REVIEWERS = ("I", "My friend", "My wife", "The audience", "Everyone I know", "My brother",
             "The critics", "My whole family", "Half the theater")
OPINION_VERBS = ("thought", "felt", "found", "said", "agreed")
# Closing verdicts with their polarity.
VERDICTS = (("I would recommend it to anyone", 2.5), ("it is worth every minute", 2.5),
            ("I would happily watch it again", 2.0), ("see it on the big screen", 2.0),
            ("it is worth a look", 1.0), ("it is fine for a quiet evening", 0.8),
            ("it is hard to say", 0.0), ("your mileage may vary", 0.0),
            ("wait until it is free", -1.0), ("I would not watch it twice", -1.2),
            ("skip this one", -2.0), ("it is a waste of time", -2.6),
            ("I want those two hours back", -3.0), ("avoid it at all costs", -3.0))
VERDICT_OPENERS = ("Overall,", "In the end,", "All in all,", "Honestly,", "To sum up,",
                   "Bottom line:")

LABELS = ("negative", "mixed", "positive")
_MIXED_BAND = 0.35  # |score| below this is "mixed": a graded, not binary, sentiment
_CLASS_PROBS = (0.45, 0.1, 0.45)  # negative, mixed, positive latent reviews


class _Stream:
  """Uniform floats from one seeded numpy generator, drawn in blocks for speed."""

  def __init__(self, seed: int):
    self._rng = np.random.default_rng(seed)
    self._buf: list[float] = []
    self._i = 0

  def uniform(self) -> float:
    if self._i == len(self._buf):
      self._buf = self._rng.random(1 << 16).tolist()
      self._i = 0
    self._i += 1
    return self._buf[self._i - 1]

  def pick(self, seq):
    return seq[int(self.uniform() * len(seq))]

  def normal(self) -> float:
    # Sum of four uniforms: close enough to a Gaussian here and deterministic.
    return (sum(self.uniform() for _ in range(4)) - 2.0) * 1.7320508


@dataclasses.dataclass(frozen=True)
class CorpusPaths:
  """Files written by write_corpus."""
  out_dir: Path
  reviews: Path  # JSON lines: {"text", "label", "score"}


def _title(s: _Stream) -> str:
  return f"{s.pick(TITLE_FIRST)} {s.pick(TITLE_SECOND)}"


def _person(s: _Stream) -> str:
  return f"{s.pick(FIRST_NAMES)} {s.pick(LAST_NAMES)}"


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _graded(s: _Stream, target: float, adjectives=ADJECTIVES, intensifiers=INTENSIFIERS,
            negate: bool = True) -> tuple[str, float]:
  """An adjective phrase ("not very dull") whose polarity is near `target`."""
  negation, neg_mult = ("", 1.0)
  if negate and s.uniform() < 0.12 and abs(target) < 1.8:
    negation, neg_mult = s.pick(NEGATIONS)
    target = target / neg_mult  # the adjective must overshoot the other way
  word, mult = s.pick(intensifiers) if not negation or s.uniform() < 0.3 else ("", 1.0)
  level = max(-3, min(3, round(target / mult))) or (1 if target >= 0 else -1)
  adj = s.pick(adjectives[level])
  phrase = " ".join(w for w in (negation, word, adj) if w)
  return phrase, level * mult * neg_mult


def _opinion(s: _Stream, target: float, title: str, intensifiers=INTENSIFIERS) -> tuple[str, float]:
  """One sentence that expresses a sentiment near `target`; returns (text, polarity)."""
  kind = int(s.uniform() * 7)
  if kind == 0:
    phrase, p = _graded(s, target, intensifiers=intensifiers)
    aspect = s.pick(ASPECTS)
    return f"{aspect.capitalize()} {s.pick(('is', 'was', 'felt', 'seemed'))} {phrase}.", p
  if kind == 1:
    phrase, p = _graded(s, target, intensifiers=intensifiers)
    return (f"{_person(s)} gives {_article(phrase)} {phrase} performance as the "
            f"{s.pick(PROFESSIONS)}.", p)
  if kind == 2:
    phrase, p = _graded(s, target, intensifiers=intensifiers)
    return f"{title} is {_article(phrase)} {phrase} {s.pick(GENRES)}.", p
  if kind == 3:
    phrase, p = _graded(s, target, intensifiers=intensifiers)
    verb = s.pick(OPINION_VERBS)
    link = " " if verb == "found" else " was "
    return f"{s.pick(REVIEWERS)} {verb} {s.pick(ASPECTS)}{link}{phrase}.", p
  if kind == 4:
    # A contrast: the clause after "but" weighs more, as readers take it.
    first, p1 = _graded(s, -target + s.normal(), intensifiers=intensifiers)
    second, p2 = _graded(s, target, intensifiers=intensifiers)
    return (f"{s.pick(ASPECTS).capitalize()} is {first}, but {s.pick(ASPECTS)} is "
            f"{second}.", 0.3 * p1 + 0.7 * p2)
  if kind == 5:
    verdict, p = min(VERDICTS, key=lambda v: abs(v[1] - target) + 0.8 * s.uniform())
    return f"{s.pick(VERDICT_OPENERS)} {verdict}.", p
  phrase, p = _graded(s, target, intensifiers=intensifiers)
  return f"Watching it was {phrase}, and {s.pick(ASPECTS)} shows why.", p


def _neutral(s: _Stream, title: str) -> str:
  """A plot or context sentence that carries no sentiment."""
  kind = int(s.uniform() * 6)
  if kind == 0:
    age = s.pick(AGES)
    return (f"{_article(age).capitalize()} {age} {s.pick(PROFESSIONS)} "
            f"{s.pick(PLOT_VERBS)} {s.pick(PLOT_OBJECTS)} in {s.pick(PLACES)}.")
  if kind == 1:
    return (f"The story follows {_person(s)}, a {s.pick(PROFESSIONS)} who "
            f"{s.pick(PLOT_VERBS)} {s.pick(PLOT_OBJECTS)} {s.pick(PLOT_TIMES)}.")
  if kind == 2:
    return f"I saw {title} {s.pick(WHEN)} with {s.pick(COMPANY)}."
  if kind == 3:
    return f"It was directed by {_person(s)} and stars {_person(s)} and {_person(s)}."
  if kind == 4:
    source = s.pick(SOURCES)
    return f"It is based on {_article(source)} {source} and set in {s.pick(PLACES)}."
  minutes, year = 90 + 5 * int(s.uniform() * 13), 1970 + int(s.uniform() * 54)
  return f"It runs about {minutes} minutes and came out in {year}."


def _review(s: _Stream) -> dict:
  u = s.uniform()
  cls = 0 if u < _CLASS_PROBS[0] else (1 if u < _CLASS_PROBS[0] + _CLASS_PROBS[1] else 2)
  mu = (cls - 1) * (0.5 + 2.0 * s.uniform()) if cls != 1 else 0.6 * (s.uniform() - 0.5)
  title = _title(s)
  n = 2 + int(s.uniform() * 4)  # 2..5 sentences
  n_opinion = max(1, n - int(s.uniform() * 3))
  slots = [True] * n_opinion + [False] * (n - n_opinion)
  # Neutral sentences lean to the front (context first), with some shuffling.
  slots.sort(key=lambda op: op + 1.5 * s.uniform())
  sentences, polarities = [], []
  for is_opinion in slots:
    if is_opinion:
      text, p = _opinion(s, mu + 0.9 * s.normal(), title)
      sentences.append(text)
      polarities.append(p)
    else:
      sentences.append(_neutral(s, title))
  score = sum(polarities) / len(polarities)
  label = LABELS[0] if score < -_MIXED_BAND else (LABELS[2] if score > _MIXED_BAND else LABELS[1])
  return {"text": " ".join(sentences), "label": label, "score": round(score, 4)}



# ----------------------------------------------------------------------------- voiced regime
# Reviews as people post them: a rating and a one-line title first, written in the
# reviewer's voice, then a body that keeps both. A voice is a register (how the reviewer
# writes) and an intensity (how strongly they grade).

REGISTERS = ("terse", "plain", "elaborate")
_REGISTER_PROBS = (0.3, 0.4, 0.3)
# intensity -> (scale of the expressed sentiment, intensifiers the writer uses)
INTENSITIES = {
    "mild": (0.7, (("", 1.0), ("fairly", 0.8), ("quite", 1.1), ("rather", 0.9), ("pretty", 0.9))),
    "even": (1.0, (("", 1.0), ("", 1.0), ("", 1.0), ("very", 1.3), ("really", 1.3))),
    "strong": (1.4, (("truly", 1.3), ("incredibly", 1.5), ("extremely", 1.6), ("absolutely", 1.6),
                     ("genuinely", 1.2), ("", 1.0))),
}
# Terse reviewers: a handful of common words and templates.
TERSE_ADJECTIVES = {3: ("great", "amazing"), 2: ("good", "nice"), 1: ("okay", "decent", "fun"),
                    -1: ("meh", "poor"), -2: ("bad", "boring"), -3: ("awful", "terrible")}
TERSE_INTENSIFIERS = {"mild": (("", 1.0), ("pretty", 0.9), ("quite", 1.1)),
                      "even": (("", 1.0), ("", 1.0), ("very", 1.3)),
                      "strong": (("really", 1.3), ("so", 1.5), ("", 1.0))}
TERSE_ASPECTS = ("The acting", "The story", "The music", "The ending", "The cast", "The plot")
TERSE_VERDICTS = (("Loved it.", 2.5), ("Would watch again.", 2.0), ("Worth it.", 1.5),
                  ("It was okay.", 0.5), ("Not for me.", -1.0), ("Not worth it.", -2.0),
                  ("Hated it.", -2.8))
# Elaborate reviewers: the plain adjectives and rarer ones.
LITERARY = {3: ("luminous", "transcendent", "exhilarating", "virtuosic", "sublime", "radiant"),
            2: ("poignant", "absorbing", "assured", "elegant", "tender", "haunting", "vivid"),
            1: ("serviceable", "diverting", "modest", "genial", "tidy", "unassuming"),
            -1: ("meandering", "derivative", "listless", "ponderous", "tepid", "facile"),
            -2: ("turgid", "leaden", "vapid", "plodding", "overwrought", "glib"),
            -3: ("execrable", "interminable", "witless", "inert", "grotesque", "squalid")}
ELABORATE_ADJECTIVES = {level: words + LITERARY[level] for level, words in ADJECTIVES.items()}
_VOICED_NOISE = 0.35  # spread of an opinion sentence around the review's sentiment (plain regime: 0.9)


@dataclasses.dataclass(frozen=True)
class Voice:
  register: str     # terse | plain | elaborate
  intensity: str    # mild | even | strong


def rating_of(mu: float) -> int:
  """The star rating (1..10) a reviewer of latent sentiment `mu` (about -2.5..2.5) gives."""
  return max(1, min(10, round(5.5 + 1.8 * mu)))


def _terse_phrase(s: _Stream, target: float, voice: Voice) -> tuple[str, float]:
  return _graded(s, target, TERSE_ADJECTIVES, TERSE_INTENSIFIERS[voice.intensity], negate=False)


def _terse_title(s: _Stream, phrase: str, voice: Voice) -> str:
  end = "!" if voice.intensity == "strong" else "."
  movie = " movie" if s.uniform() < 0.5 and " " not in phrase else ""  # "Great movie!", "Really great!"
  return f"{phrase.capitalize()}{movie}{end}"


def _terse_sentence(s: _Stream, target: float, voice: Voice, own: tuple[str, float]) -> tuple[str, float]:
  """A few words from a few templates; mostly the writer's own phrase again ("The story was great.")."""
  kind = int(s.uniform() * 5)
  if kind <= 2:
    return f"{s.pick(TERSE_ASPECTS)} was {own[0]}.", own[1]
  if kind == 3:
    return min(TERSE_VERDICTS, key=lambda v: abs(v[1] - target) + 0.5 * s.uniform())
  phrase, p = _terse_phrase(s, target, voice)
  return f"{s.pick(TERSE_ASPECTS)} was {phrase}.", p


def _plain_title(s: _Stream, target: float, voice: Voice) -> tuple[str, float]:
  phrase, p = _graded(s, target, intensifiers=INTENSITIES[voice.intensity][1], negate=False)
  return f"{_article(phrase).capitalize()} {phrase} {s.pick(GENRES)}.", p


def _elaborate_title(s: _Stream, target: float, voice: Voice, title: str) -> tuple[str, float]:
  phrase, p = _graded(s, target, ELABORATE_ADJECTIVES, INTENSITIES[voice.intensity][1], negate=False)
  age = s.pick(AGES)
  return (f"{title}: {_article(phrase)} {phrase} {s.pick(GENRES)} about {_article(age)} {age} "
          f"{s.pick(PROFESSIONS)}."), p


def _elaborate_sentence(s: _Stream, target: float, voice: Voice, title: str) -> tuple[str, float | None]:
  """A long sentence with names, places and plot around one graded judgement."""
  text, p = _elaborate_clause(s, target, voice, title)
  if s.uniform() < 0.5:  # and one more turn of the plot
    text += (f", {s.pick(('while', 'just as', 'after', 'long before'))} {_person(s)} "
             f"{s.pick(PLOT_VERBS)} {s.pick(PLOT_OBJECTS)} in {s.pick(PLACES)}")
  return text + ".", p


def _elaborate_clause(s: _Stream, target: float, voice: Voice, title: str) -> tuple[str, float | None]:
  kind = int(s.uniform() * 5)
  if kind == 4:
    return (f"Set in {s.pick(PLACES)} {s.pick(PLOT_TIMES)}, the story follows {_person(s)}, "
            f"{_article(s.pick(AGES))} {s.pick(AGES)} {s.pick(PROFESSIONS)} who {s.pick(PLOT_VERBS)} "
            f"{s.pick(PLOT_OBJECTS)}"), None
  phrase, p = _graded(s, target, ELABORATE_ADJECTIVES, INTENSITIES[voice.intensity][1])
  if kind == 0:
    age = s.pick(AGES)
    return (f"{_person(s)} plays {_article(age)} {age} {s.pick(PROFESSIONS)} who {s.pick(PLOT_VERBS)} "
            f"{s.pick(PLOT_OBJECTS)}, and the performance is {phrase}"), p
  if kind == 1:
    source, where, there = s.pick(SOURCES), s.pick(PLACES), s.pick(PLACES)
    moves = f"stays in {where}" if where == there else f"moves from {where} to {there}"
    return (f"Adapted by {_person(s)} from {_article(source)} {source}, {title} {moves}, and "
            f"{s.pick(ASPECTS)} is {phrase}"), p
  if kind == 2:
    return (f"{s.pick(ASPECTS).capitalize()} is {phrase}, especially when {_person(s)} "
            f"{s.pick(PLOT_VERBS)} {s.pick(PLOT_OBJECTS)} {s.pick(PLOT_TIMES)}"), p
  return (f"What stays with me is {s.pick(ASPECTS)}, which is {phrase}, as in the scene where "
          f"{_person(s)} {s.pick(PLOT_VERBS)} {s.pick(PLOT_OBJECTS)}"), p


def _voiced_review(s: _Stream) -> dict:
  """A review with a rating and a title in the reviewer's voice, and a body that keeps both."""
  u = s.uniform()
  cls = 0 if u < _CLASS_PROBS[0] else (1 if u < _CLASS_PROBS[0] + _CLASS_PROBS[1] else 2)
  mu = (cls - 1) * (0.5 + 2.0 * s.uniform()) if cls != 1 else 0.6 * (s.uniform() - 0.5)
  u = s.uniform()
  register = REGISTERS[0] if u < _REGISTER_PROBS[0] else (
      REGISTERS[1] if u < _REGISTER_PROBS[0] + _REGISTER_PROBS[1] else REGISTERS[2])
  voice = Voice(register, s.pick(tuple(INTENSITIES)))
  scale, intensifiers = INTENSITIES[voice.intensity]
  expressed = scale * mu  # the verdict, as strongly as this reviewer grades

  def target() -> float:  # the title states the verdict; body sentences scatter a little around it
    return expressed + _VOICED_NOISE * s.normal()

  film = _title(s)
  if register == "terse":
    own = _terse_phrase(s, expressed, voice)
    head, p = _terse_title(s, own[0], voice), own[1]
    body = [_terse_sentence(s, target(), voice, own) for _ in range(3 + int(s.uniform() * 4))]
  elif register == "plain":
    head, p = _plain_title(s, expressed, voice)
    body = []
    for _ in range(2 + int(s.uniform() * 3)):
      body.append(_opinion(s, target(), film, intensifiers) if s.uniform() < 0.75 else (_neutral(s, film), None))
  else:
    head, p = _elaborate_title(s, expressed, voice, film)
    body = [_elaborate_sentence(s, target(), voice, film) for _ in range(2 + int(s.uniform() * 3))]
  polarities = [p] + [q for _, q in body if q is not None]
  score = sum(polarities) / len(polarities)
  label = LABELS[0] if score < -_MIXED_BAND else (LABELS[2] if score > _MIXED_BAND else LABELS[1])
  text = " ".join([f"{rating_of(mu)}/10 {head}"] + [t for t, _ in body])
  return {"text": text, "label": label, "score": round(score, 4), "rating": rating_of(mu),
          "register": voice.register, "intensity": voice.intensity}

# regime -> one review from the stream: "plain" reviews (the first regime) open anywhere in a
# review and their prompt says little of what follows; "voiced" ones open with rating and title.
REGIMES = {"plain": _review, "voiced": _voiced_review}


def generate_reviews(n_reviews: int = 20000, seed: int = 0, regime: str = "plain") -> list[dict]:
  """`n_reviews` reviews as {"text", "label", "score", ...} dicts; a pure function of the seed.

  "voiced" rows also carry the latent "rating", "register" and "intensity".
  """
  s = _Stream(seed)
  review = REGIMES[regime]
  return [review(s) for _ in range(n_reviews)]


def pretraining_texts(n_reviews: int = 20000, seed: int = 0, regime: str = "plain") -> list[str]:
  """All review texts, for training the tokenizer and the SFT / pretraining stage."""
  return [r["text"] for r in generate_reviews(n_reviews, seed, regime)]


def write_corpus(out_dir: str | Path, n_reviews: int = 20000, seed: int = 0,
                 regime: str = "plain") -> CorpusPaths:
  """Writes out_dir/reviews.jsonl; the same seed and regime give the same bytes."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps(r, sort_keys=True, ensure_ascii=False)
           for r in generate_reviews(n_reviews, seed, regime)]
  reviews = out_dir / "reviews.jsonl"
  reviews.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
  return CorpusPaths(out_dir=out_dir, reviews=reviews)
