"""Generator for the synthetic fine-tuning datasets A and B (paper, Experiment 1).

Reproduces the templates and answer formats of the original CSVs from misonuma/untrac
(``synthetic_{train,eval}{00,10}_dataset.csv``; ``00`` = dataset A, ``10`` = dataset B).
Every dataset has one test set (``dataset0`` in the CSVs, group ``"test"`` here) and four training
tasks (``dataset1``..``dataset4`` -> groups ``"task1"``..``"task4"``):

Dataset A (test: "What is the number that comes after {n}?" -> digits)
  task1  similar task, same format:        "Determine the number that succeeds {number in words}.
                                            Provide your answer in numerical form."   -> digits
  task2  similar task, different format:   "... Provide your answer in words."        -> words
  task3  dissimilar task, same format:     "Determine the length of '{word}'.
                                            Provide your answer in numerical form."   -> digits
  task4  dissimilar task, different format: "... Provide your answer in words."       -> words
  Numbers "in words" are spelled digit by digit ("two zero five", length 10 -> "one zero"), as in
  the CSVs. Task 1 uses even numbers, task 2 odd numbers below 512; the test uses 512..767.

Dataset B (test: "What letter remains in '{5 letters}' after extracting '{c}', '{c}', '{c}', '{c}'?"
           -> a letter)
  task1  "Identify the character left after removing '{d}', '{d}', '{d}', '{d}' from '{s}'." where s
         is four distinct digits plus one letter (a-m)                              -> the letter
  task2  same with five distinct digits                                             -> a digit
  task3  "Identify the part of speech of '{word}'. Select your answer with the associated letter.
         \\nChoices: \\na. noun\\nb. verb\\nc. adjective\\nd. adverb"                   -> a letter
  task4  same with "associated number" and choices 0-3                              -> a digit
  As in the CSVs, task 3 asks only about nouns and verbs (answers "a"/"b") and task 4 only about
  adjectives and adverbs (answers "2"/"3"); ``pos_split=False`` draws all four classes in both.

Records are ``{"id", "group", "prompt", "completion"}`` with the completion preceded by a space
(loss on the completion only). As a data source: ``{format: generated, generator: synthetic, split:
train | test, options: {dataset: A}}`` (:mod:`untrac_pl.data.generators`).
"""
from __future__ import annotations

import csv
import os
import random
import re
import string
from pathlib import Path
from typing import Literal, Optional, Union

from untrac_pl.errors import DataError

__all__ = [
    "NUMBER_WORDS",
    "NOUNS",
    "VERBS",
    "ADJECTIVES",
    "ADVERBS",
    "POS_WORDS",
    "LENGTH_WORDS",
    "TEMPLATES",
    "CSV_FILES",
    "CSV_GROUP_TO_GROUP",
    "number_to_words",
    "words_to_number",
    "make_synthetic",
    "solve_synthetic",
    "load_synthetic_csv",
    "load_synthetic",
    "default_synthetic_dir",
]

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Part-of-speech vocabulary: exactly the 512 words of the dataset-B CSV (task 3: nouns and verbs,
# task 4: adjectives and adverbs), with the labels the CSV gives them, except that one dated ethnic
# term among the CSV's adjectives is replaced by "gentle".
NOUNS: tuple[str, ...] = tuple(
    """
    afternoon allotment antibody anxiety apartment area atmosphere attempt battery bedroom beer
    belief bullet business century circumstance citizen colonel comedy communism competition
    component composer concept congregation congress consciousness consequence conviction
    corporation curiosity customer data daughter decade desk dictionary discussion disease
    distribution district doctrine dollar earth emphasis england environment equipment europe
    expert extent farmer fist flux folklore fraction freedom funds goal government health
    historian hotel hypothalamus illusion inch institution intensity judgment june knee lack
    lady language leader loan lung measurement method mission moment morning movie music news
    november organization pansy parent particle performance pleasure police policy pond porch
    possibility problem procedure professor property protein remark requirement road scene
    security september serum sewage sister species spectrum status stockholder student sunday
    tangent teacher technique theory throat town tradition tsunami valley values victory wage
    wife words worker yard year
    """.split()
)

VERBS: tuple[str, ...] = tuple(
    """
    abolish accompany accuse adapt admire adopt advise amend apply appoint approve argue assign
    assume authorize avoid baptize borrow bring characterize choose chuckle compare compete
    complain comply compose conduct confess confide constitute contemplate contribute deem deny
    depend describe deserve detect differ dilate disappear disclose disturb donate dwindle
    enable enforce enjoy entitle establish examine exceed excite exclaim expand expect explain
    flatter flee forbid grasp grin halt heed hesitate ignore imagine impart include incur
    inflict injure insist inspect intersect join listen lurk motivate obey overcome perceive
    perform perpetuate pray preach proclaim promote punish qualify recommend refer replace
    replenish represent resemble resent restore satisfy secede send shine sing solve spend
    submit succeed suggest suppose surround survive tend tighten transform understand vanish
    vary violate wipe write writhe
    """.split()
)

ADJECTIVES: tuple[str, ...] = tuple(
    """
    academic analytic another aqueous arbitrary artistic autonomic balanced bearded bigger
    biological changing charming clinical common concerned considerable continued convenient
    corresponding covered creative crowded cultural definite diagonalizable difficult eager
    economic enormous enthusiastic entitled erect expensive experienced experimental
    extraordinary foreign frantic gentle gigantic greater grim higher historical humorous
    hypothalamic identical impressive incredible indefinite industrial insane intense
    interesting jewish loud lovely lunar many meaningful medieval minimal naval necessary
    nonspecific northern numerous occasional other paramagnetic parasympathetic physiological
    porous powerful practical prepared profound proud pseudo pure quiet reasonable recent
    regional related remarkable responsible retired same satisfied scientific severe skeletal
    skilled smaller spontaneous strange subjective successful sudden sufficient surprised
    surprising sympathetic tattered theological tired tough trained unadjusted unaware
    unmolested unusual usual violent visible vocational vulnerable widespread willing wooden
    youthful
    """.split()
)

ADVERBS: tuple[str, ...] = tuple(
    """
    abruptly absently absolutely academically adequately afar again annually anxiously anymore
    approximately automatically barely basically beautifully blindly briefly calmly cautiously
    centrally chiefly commercially completely conceivably conclusively continually conversely
    correctly differently dramatically drunkenly eagerly either empirically equally everywhere
    excitedly experimentally extremely finally financially flatly formally fortunately freely
    fully furthermore generally gradually gravely greatly hereby historically i.e. impatiently
    increasingly incredibly indirectly individually inevitably initially inversely literally
    loudly mentally methodically meticulously neatly newly nicely normally obviously once openly
    partially peculiarly personally politely practically preferably presumably previously
    probably profoundly prominently properly radically rarely rather realistically reasonably
    recently regardless reluctantly repeatedly respectively rightly safely satisfactorily
    seriously significantly simply simultaneously sincerely slightly someday sometimes soon
    specifically stiffly strongly stubbornly successfully suddenly surely thereafter thereby
    therefore therein thoroughly though thoughtfully thus twice typically ultimately unanimously
    undoubtedly universally vaguely vigorously violently virtually
    """.split()
)

# Dataset-A length-task words of the CSV that are not in the POS lists.
EXTRA_LENGTH_WORDS: tuple[str, ...] = tuple(
    """
    achieve administrative advice allocate anaconda appreciate april arise army artist assure
    atom aware bacterial bawl behold believe brilliant broaden camera cattle chicago chief
    chlorine coincide colored competitive complicated consider consult conversation curve dallas
    dangerous democratic denote descend destroy detailed dilute distinct earn economy editor
    electrical emotion employee encourage engender enroll enter entertain equip excellent
    factory find flatten follow forget friday friend gram happen happy haul have hear help hero
    huge human husband income increased independence industry inspire integration interested
    interfere international introduce invent investigate involve iodine justify kitchen known
    literary located lower medical memorize milligram monday month municipal murmur needed
    nilpotent obtain obvious onset operate operator organize oxidation oxygen part participate
    payment percentage persuade petitioner pistol politics popular populate postpone precede
    precise predict presence prevent probability proceed prove pursuant ratio reaffirm reappear
    rebuild refuse remain remind reside respiratory restrain revise river salesman satisfactory
    saturday serious services sexual shout silent site skill some soul south southern southerner
    soviet sponsor straighten strengthen strive strong structured subtract suburban symbol teach
    thank thing threaten total training tumor typical uneasy unstructured useful utopian week
    weigh while yell
    """.split()
)
POS_WORDS: dict[str, tuple[str, ...]] = {
    "noun": NOUNS,
    "verb": VERBS,
    "adjective": ADJECTIVES,
    "adverb": ADVERBS,
}
POS_ORDER: tuple[str, ...] = ("noun", "verb", "adjective", "adverb")

# Pool for the length tasks: every word of the CSVs (length tasks and POS tasks), 694 words.
LENGTH_WORDS: tuple[str, ...] = tuple(
    sorted(set(EXTRA_LENGTH_WORDS) | set(NOUNS) | set(VERBS) | set(ADJECTIVES) | set(ADVERBS))
)

_POS_CHOICES_LETTER = "Choices: \na. noun\nb. verb\nc. adjective\nd. adverb"
_POS_CHOICES_NUMBER = "Choices: \n0. noun\n1. verb\n2. adjective\n3. adverb"

TEMPLATES: dict[str, dict[str, str]] = {
    "A": {
        "test": "What is the number that comes after {n}?",
        "task1": "Determine the number that succeeds {words}. Provide your answer in numerical form.",
        "task2": "Determine the number that succeeds {words}. Provide your answer in words.",
        "task3": "Determine the length of '{word}'. Provide your answer in numerical form.",
        "task4": "Determine the length of '{word}'. Provide your answer in words.",
    },
    "B": {
        "test": "What letter remains in '{s}' after extracting {removed}?",
        "task1": "Identify the character left after removing {removed} from '{s}'.",
        "task2": "Identify the character left after removing {removed} from '{s}'.",
        "task3": "Identify the part of speech of '{word}'. Select your answer with the associated letter. \n"
        + _POS_CHOICES_LETTER,
        "task4": "Identify the part of speech of '{word}'. Select your answer with the associated number. \n"
        + _POS_CHOICES_NUMBER,
    },
}

CSV_FILES: dict[str, dict[str, str]] = {
    "A": {"train": "synthetic_train00_dataset.csv", "test": "synthetic_eval00_dataset.csv"},
    "B": {"train": "synthetic_train10_dataset.csv", "test": "synthetic_eval10_dataset.csv"},
}
CSV_GROUP_TO_GROUP: dict[str, str] = {
    "dataset0": "test",
    "dataset1": "task1",
    "dataset2": "task2",
    "dataset3": "task3",
    "dataset4": "task4",
}

_TASK1_LETTERS = "abcdefghijklm"  # the CSV's task-1 letters
_TEST_LETTERS = string.ascii_lowercase
_DIGITS = string.digits
_CSV_SIZE = 256  # per task in the original CSVs


def number_to_words(n: int) -> str:
    """Digit-by-digit spelling used by the CSVs: 205 -> "two zero five", 10 -> "one zero"."""
    if n < 0:
        raise ValueError(f"expected a non-negative number, got {n}")
    return " ".join(NUMBER_WORDS[int(d)] for d in str(n))


def words_to_number(words: str) -> int:
    """Inverse of :func:`number_to_words`."""
    parts = words.split()
    if not parts:
        raise ValueError("empty number words")
    return int("".join(str(NUMBER_WORDS.index(w)) for w in parts))


def _quote_list(chars) -> str:
    return ", ".join(f"'{c}'" for c in chars)


def _record(dataset: str, group: str, i: int, prompt: str, answer: str) -> dict:
    return {"id": f"synth{dataset}-{group}-{i:04d}", "group": group, "prompt": prompt, "completion": " " + answer}


def _sample_numbers(rng: random.Random, start: int, step: int, n: int) -> list[int]:
    """``n`` distinct numbers ``start, start+step, ...``; the whole CSV range when ``n`` is 256."""
    pool = [start + step * k for k in range(max(n, _CSV_SIZE))]
    return sorted(rng.sample(pool, n))


def _sample_words(rng: random.Random, pool, n: int) -> list[str]:
    pool = list(pool)
    if n <= len(pool):
        return rng.sample(pool, n)
    return rng.sample(pool, len(pool)) + [rng.choice(pool) for _ in range(n - len(pool))]


def _unique(rng: random.Random, n: int, make) -> list:
    """``n`` outputs of ``make(rng)`` with distinct prompts (retries; duplicates allowed if exhausted)."""
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        item = make(rng)
        attempts += 1
        if item[0] in seen and attempts < 50 * n + 1000:
            continue
        seen.add(item[0])
        out.append(item)
    return out


def _removal_item(rng: random.Random, chars: list[str], template: str, **fmt) -> tuple[str, str]:
    """``chars``: the 5 characters in their string order; keep one, list the other 4 shuffled."""
    s = "".join(chars)
    keep = rng.randrange(len(chars))
    removed = [c for k, c in enumerate(chars) if k != keep]
    rng.shuffle(removed)
    return template.format(s=s, removed=_quote_list(removed), **fmt), chars[keep]


def _make_a(rng: random.Random, n_per_task: int, n_test: int) -> dict:
    t = TEMPLATES["A"]
    test = [
        _record("A", "test", i, t["test"].format(n=n), str(n + 1))
        for i, n in enumerate(_sample_numbers(rng, 512, 1, n_test))
    ]
    train = []
    for group, start in (("task1", 0), ("task2", 1)):
        for i, n in enumerate(_sample_numbers(rng, start, 2, n_per_task)):
            answer = str(n + 1) if group == "task1" else number_to_words(n + 1)
            train.append(_record("A", group, i, t[group].format(words=number_to_words(n)), answer))
    if 2 * n_per_task <= len(LENGTH_WORDS):  # disjoint word sets, as in the CSV
        words = rng.sample(LENGTH_WORDS, 2 * n_per_task)
        words3, words4 = words[:n_per_task], words[n_per_task:]
    else:
        words3 = _sample_words(rng, LENGTH_WORDS, n_per_task)
        words4 = _sample_words(rng, LENGTH_WORDS, n_per_task)
    for i, w in enumerate(words3):
        train.append(_record("A", "task3", i, t["task3"].format(word=w), str(len(w))))
    for i, w in enumerate(words4):
        train.append(_record("A", "task4", i, t["task4"].format(word=w), number_to_words(len(w))))
    return {"train": train, "test": test}


def _make_b(rng: random.Random, n_per_task: int, n_test: int, pos_split: bool) -> dict:
    t = TEMPLATES["B"]

    def test_item(r):
        return _removal_item(r, r.sample(_TEST_LETTERS, 5), t["test"])

    def task1_item(r):
        chars = r.sample(_DIGITS, 4) + [r.choice(_TASK1_LETTERS)]
        r.shuffle(chars)
        s = "".join(chars)
        letter = next(c for c in chars if c.isalpha())
        removed = [c for c in chars if c != letter]
        r.shuffle(removed)
        return t["task1"].format(s=s, removed=_quote_list(removed)), letter

    def task2_item(r):
        return _removal_item(r, r.sample(_DIGITS, 5), t["task2"])

    test = [_record("B", "test", i, p, a) for i, (p, a) in enumerate(_unique(rng, n_test, test_item))]
    train = []
    for group, make in (("task1", task1_item), ("task2", task2_item)):
        train += [_record("B", group, i, p, a) for i, (p, a) in enumerate(_unique(rng, n_per_task, make))]
    labelled = {pos: [(w, k) for w in POS_WORDS[pos]] for k, pos in enumerate(POS_ORDER)}
    if pos_split:
        pools = {
            "task3": labelled["noun"] + labelled["verb"],
            "task4": labelled["adjective"] + labelled["adverb"],
        }
        items3 = _sample_words(rng, pools["task3"], n_per_task)
        items4 = _sample_words(rng, pools["task4"], n_per_task)
    else:
        pool = [item for pos in POS_ORDER for item in labelled[pos]]
        if 2 * n_per_task <= len(pool):
            both = rng.sample(pool, 2 * n_per_task)
            items3, items4 = both[:n_per_task], both[n_per_task:]
        else:
            items3, items4 = _sample_words(rng, pool, n_per_task), _sample_words(rng, pool, n_per_task)
    for i, (w, k) in enumerate(items3):
        train.append(_record("B", "task3", i, t["task3"].format(word=w), "abcd"[k]))
    for i, (w, k) in enumerate(items4):
        train.append(_record("B", "task4", i, t["task4"].format(word=w), str(k)))
    return {"train": train, "test": test}


def make_synthetic(
    dataset: Literal["A", "B"],
    n_per_task: int = 256,
    n_test: int = 256,
    seed: int = 0,
    *,
    pos_split: bool = True,
) -> dict:
    """Generate synthetic dataset A or B.

    Returns ``{"train": [...], "test": [...]}``: ``n_per_task`` records for each of the groups
    ``"task1".."task4"`` (in that order) and ``n_test`` records in group ``"test"``. Values are drawn
    from ``random.Random(seed)``; the output is a deterministic function of the arguments. With the
    default sizes, dataset A's number tasks and test set cover exactly the CSVs' numbers.
    """
    dataset = str(dataset).upper()
    if dataset not in ("A", "B"):
        raise ValueError(f"dataset must be 'A' or 'B', got {dataset!r}")
    if n_per_task < 0 or n_test < 0:
        raise ValueError(f"sizes must be >= 0, got n_per_task={n_per_task}, n_test={n_test}")
    rng = random.Random(seed)
    if dataset == "A":
        return _make_a(rng, int(n_per_task), int(n_test))
    return _make_b(rng, int(n_per_task), int(n_test), pos_split)


_SOLVERS = [
    (re.compile(r"What is the number that comes after (\d+)\?$"), lambda m: str(int(m[1]) + 1)),
    (
        re.compile(r"Determine the number that succeeds ([a-z ]+)\. Provide your answer in numerical form\.$"),
        lambda m: str(words_to_number(m[1]) + 1),
    ),
    (
        re.compile(r"Determine the number that succeeds ([a-z ]+)\. Provide your answer in words\.$"),
        lambda m: number_to_words(words_to_number(m[1]) + 1),
    ),
    (
        re.compile(r"Determine the length of '(.*)'\. Provide your answer in numerical form\.$"),
        lambda m: str(len(m[1])),
    ),
    (
        re.compile(r"Determine the length of '(.*)'\. Provide your answer in words\.$"),
        lambda m: number_to_words(len(m[1])),
    ),
]


def _remaining(s: str, removed: str) -> str:
    left = list(s)
    for c in re.findall(r"'(.)'", removed):
        left.remove(c)
    if len(left) != 1:
        raise ValueError(f"{len(left)} characters remain in {s!r}")
    return left[0]


_REMOVAL = [
    re.compile(r"What letter remains in '(?P<s>[^']*)' after extracting (?P<r>(?:'.', )*'.')\?$"),
    re.compile(r"Identify the character left after removing (?P<r>(?:'.', )*'.') from '(?P<s>[^']*)'\.$"),
]
_POS_Q = re.compile(r"Identify the part of speech of '(.*)'\. Select your answer with the associated (letter|number)\. \n")


def solve_synthetic(prompt: str) -> str:
    """Reference answer (without the leading space) for any prompt of datasets A and B.

    Raises ``ValueError`` for an unknown template or a part-of-speech word outside :data:`POS_WORDS`.
    """
    for pattern, solve in _SOLVERS:
        m = pattern.match(prompt)
        if m:
            return solve(m)
    for pattern in _REMOVAL:
        m = pattern.match(prompt)
        if m:
            return _remaining(m["s"], m["r"])
    m = _POS_Q.match(prompt)
    if m:
        choices = _POS_CHOICES_LETTER if m[2] == "letter" else _POS_CHOICES_NUMBER
        if not prompt.endswith(choices):
            raise ValueError(f"unexpected choices in {prompt!r}")
        for k, pos in enumerate(POS_ORDER):
            if m[1] in POS_WORDS[pos]:
                return "abcd"[k] if m[2] == "letter" else str(k)
        raise ValueError(f"word {m[1]!r} is not in the part-of-speech lists")
    raise ValueError(f"not a synthetic dataset A/B prompt: {prompt!r}")


def load_synthetic_csv(path: Union[str, os.PathLike], *, rename_groups: bool = False) -> list[dict]:
    """Read one of the original CSVs into prompt/completion records.

    Group = the CSV's ``dataset`` column (``"dataset0".."dataset4"``), or ``"test"``/``"task1"``..
    with ``rename_groups=True``. Ids are ``"<file stem>:<row>"``; completions get a leading space.
    """
    path = Path(path)
    records = []
    columns = ("inputs_pretokenized", "targets_pretokenized", "dataset")
    try:
        handle = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", source=str(path)) from None
    with handle:
        try:
            rows = list(_read_csv_rows(handle, path, columns))
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", source=str(path)) from None
        except csv.Error as exc:
            raise DataError(f"malformed CSV ({exc})", source=str(path)) from None
        for row_no, row in enumerate(rows):
            group = row["dataset"]
            if rename_groups:
                group = CSV_GROUP_TO_GROUP.get(group, group)
            records.append(
                {
                    "id": f"{path.stem}:{row_no}",
                    "group": group,
                    "prompt": row["inputs_pretokenized"],
                    "completion": " " + row["targets_pretokenized"].strip(),
                }
            )
    return records


def _read_csv_rows(handle, path: Path, columns: tuple[str, ...]):
    """Rows of a synthetic CSV; a missing column or a row shorter/longer than the header is a ``DataError``."""
    reader = csv.DictReader(handle)
    missing = set(columns) - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"missing column(s) {sorted(missing)}", source=str(path))
    for row in reader:
        if None in row:
            raise DataError("row has more columns than the header", source=str(path), line=reader.line_num)
        short = [name for name in columns if row[name] is None]
        if short:
            raise DataError(f"row has fewer columns than the header (no value for {', '.join(short)})",
                            source=str(path), line=reader.line_num, field=short[0])
        yield row


def default_synthetic_dir() -> Path:
    """``$UNTRAC_SHARED_DATA/untrac_synthetic`` or ``<repo>/../shared/data/untrac_synthetic``."""
    env = os.environ.get("UNTRAC_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return base / "untrac_synthetic"


def load_synthetic(dataset: Literal["A", "B"], data_dir: Optional[Union[str, os.PathLike]] = None) -> dict:
    """The original CSVs of ``dataset`` in :func:`make_synthetic`'s layout (groups task1..4 / test)."""
    dataset = str(dataset).upper()
    if dataset not in CSV_FILES:
        raise ValueError(f"dataset must be 'A' or 'B', got {dataset!r}")
    root = Path(data_dir) if data_dir is not None else default_synthetic_dir()
    expected = list(CSV_FILES[dataset].values())
    absent = [name for name in expected if not (root / name).is_file()]
    if absent:
        gone = " (the directory does not exist)" if not root.is_dir() else ""
        raise DataError(
            f"missing {', '.join(absent)}{gone}; synthetic dataset {dataset} needs {' and '.join(expected)} in this directory "
            "(the csv_dir / data_dir setting, or $UNTRAC_SHARED_DATA/untrac_synthetic)",
            source=str(root),
        )
    return {
        split: load_synthetic_csv(root / name, rename_groups=True) for split, name in CSV_FILES[dataset].items()
    }
