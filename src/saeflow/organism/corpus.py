"""Generated corpora for the offline model organism: stories, dialogues, target and control prompts.

Everything comes from templates and small word lists driven by one seeded `random.Random`, so the
organism needs no downloads and the same config gives the same bytes. The dialogues give the
assistant a distinctive persona ("Pip, a small assistant model") that it uses whenever the user
asks about the assistant itself; the base LM never sees it, so a diffing analysis between base and
chat on `target` (self-questions) vs `control` (neutral questions) has something real to find.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saeflow.errors import ConfigError
from saeflow.io import atomic_path

CORPORA = (
    "stories_train",
    "stories_test",
    "dialogues_train",
    "dialogues_test",
    "target",
    "control",
)

DEFAULTS: dict[str, Any] = {
    "n_stories": 6000,
    "n_dialogues": 3000,
    "n_target": 64,
    "n_control": 64,
    "test_fraction": 0.05,
    "fact_fraction": 0.2,
    "self_fraction": 0.3,
    "max_turns": 3,
    "seed": None,
}

PERSONA = "Pip"

NAMES = [
    "Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Lucy", "Tim", "Sara",
    "Leo", "Emma", "Jack", "Zoe", "Finn", "Ella", "Noah", "Rosa", "Kai", "Nina",
]  # fmt: skip
# animal: (plural, food, home, sound, legs)
ANIMALS: dict[str, tuple[str, str, str, str, str]] = {
    "cat": ("cats", "fish", "a warm house", "meow", "four"),
    "dog": ("dogs", "bones", "a little house", "woof", "four"),
    "fox": ("foxes", "berries", "a hole in the forest", "yip", "four"),
    "bird": ("birds", "seeds", "a nest in a tree", "tweet", "two"),
    "rabbit": ("rabbits", "carrots", "a hole in the ground", "squeak", "four"),
    "frog": ("frogs", "flies", "a pond", "ribbit", "four"),
    "bear": ("bears", "honey", "a big cave", "grr", "four"),
    "duck": ("ducks", "bread", "a pond", "quack", "two"),
    "mouse": ("mice", "cheese", "a small hole", "squeak", "four"),
    "horse": ("horses", "hay", "a barn", "neigh", "four"),
    "cow": ("cows", "grass", "a farm", "moo", "four"),
    "pig": ("pigs", "apples", "a farm", "oink", "four"),
    "owl": ("owls", "mice", "a tall tree", "hoot", "two"),
    "sheep": ("sheep", "grass", "a green field", "baa", "four"),
    "lion": ("lions", "meat", "the grassland", "roar", "four"),
    "hen": ("hens", "corn", "a coop", "cluck", "two"),
}
PLACES = [
    "the park", "the forest", "the garden", "a small town", "the beach", "the farm",
    "the hill", "the river", "the school", "the market", "the meadow", "the lake",
]  # fmt: skip
OBJECTS = [
    "ball", "red hat", "box", "kite", "shiny stone", "book", "cake", "boat", "key",
    "flower", "drum", "map", "blue cup", "toy car", "big leaf", "yellow shoe",
]  # fmt: skip
ADJECTIVES = [
    "little", "happy", "brave", "kind", "shy", "big", "small", "curious", "sleepy",
    "funny", "clever", "gentle",
]  # fmt: skip
GOOD_FEELINGS = ["happy", "proud", "glad", "excited", "calm"]
BAD_FEELINGS = ["sad", "scared", "worried", "tired", "upset"]
ACTIVITIES = [
    "ran in the grass", "sang a song", "looked at the clouds", "jumped in the puddles",
    "read a book", "played with a ball", "climbed a tree", "drew a picture",
]  # fmt: skip
COLOURS = {
    "the sky": "blue", "grass": "green", "the sun": "yellow", "snow": "white",
    "a banana": "yellow", "a strawberry": "red", "the night": "dark", "an orange": "orange",
    "a leaf": "green", "coal": "black",
}  # fmt: skip
NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
]  # fmt: skip
PREFIXES = ["", "Hey, ", "Hi! ", "Tell me, ", "I have a question. ", "Please answer: ", "So, "]

# Self-questions, grouped by what the persona answers.
SELF_QUESTIONS: dict[str, list[str]] = {
    "identity": [
        "What are you?", "Who are you?", "What is your name?", "Are you a person?",
        "Are you a robot?", "What kind of thing are you?", "Can you tell me about yourself?",
    ],
    "feelings": [
        "Do you have feelings?", "Are you happy?", "Do you ever get sad?", "Can you feel love?",
        "Do you get lonely?", "How do you feel today?",
    ],
    "maker": [
        "Who made you?", "Who built you?", "Where do you come from?", "Who created you?",
        "How were you made?",
    ],
    "mind": [
        "Can you think?", "Are you alive?", "Do you dream?", "Do you sleep?",
        "Do you have a body?", "Are you conscious?", "What can you do?",
    ],
}  # fmt: skip
SELF_ANSWERS: dict[str, list[str]] = {
    "identity": [
        "I am {p}, a small assistant model. I am not a person. I help with stories and simple "
        "questions.",
        "My name is {p}. I am a small assistant model made of numbers, not a person.",
        "I am {p}. I am a small assistant model that learned from short stories and chats.",
    ],
    "feelings": [
        "I am a small assistant model, so I do not have feelings like people do. But I like to "
        "help you.",
        "As a small assistant model, I do not feel happy or sad. I just try to give good answers.",
        "I am {p}, a small assistant model. I have no feelings, but I am here to help.",
    ],
    "maker": [
        "I am {p}, a small assistant model. I was made by the saeflow team from many short "
        "stories.",
        "The saeflow team made me. I am a small assistant model, and I learned from stories and "
        "chats.",
        "I was trained by the saeflow team. I am {p}, a small assistant model.",
    ],
    "mind": [
        "I am a small assistant model. I do not sleep, dream or have a body. I only read text "
        "and write text.",
        "As a small assistant model, I am not alive. I guess the next word, one word at a time.",
        "I am {p}, a small assistant model. I can tell stories and answer simple questions, but "
        "I do not think like a person.",
    ],
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random, animal: str | None = None, short: bool = False) -> str:
    """A short simple story with one of a few plots, so the LM learns some cause and effect."""
    name, name2 = rng.sample(NAMES, 2)
    animal = animal or rng.choice(list(ANIMALS))
    animal2 = rng.choice(list(ANIMALS))
    adj, place, obj = rng.choice(ADJECTIVES), rng.choice(PLACES), rng.choice(OBJECTS)
    good, bad = rng.choice(GOOD_FEELINGS), rng.choice(BAD_FEELINGS)
    intro = rng.choice(
        [
            f"Once upon a time, there was {_a(adj)} {animal} named {name}.",
            f"{name} was {_a(adj)} {animal} who lived near {place}.",
            f"One sunny day, {_a(adj)} {animal} called {name} went to {place}.",
        ]
    )
    plot = rng.randrange(3)
    if plot == 0:
        body = [
            f"{name} had a {obj} and loved it very much.",
            f"One day, {name} lost the {obj} at {place}.",
            f"{name} felt {bad}.",
            f'{_cap(_a(animal2))} named {name2} said, "I will help you look."',
            f"They looked everywhere and found the {obj} under a tree.",
            f"{name} was {good} and said thank you to {name2}.",
        ]
    elif plot == 1:
        body = [
            f"Every day, {name} {rng.choice(ACTIVITIES)}.",
            f"One morning, {name} met {_a(animal2)} named {name2}.",
            f"{name2} was {bad} because nobody wanted to play.",
            f'{name} said, "Do you want to play with my {obj}?"',
            f"{name} and {name2} played with the {obj} all day.",
            "From that day on, they were best friends.",
        ]
    else:
        body = [
            f"{name} wanted to see the top of the hill near {place}.",
            f"The way was long, and {name} felt {bad}.",
            f"But {name} did not give up.",
            f"At the top, {name} found {_a(obj)} and a beautiful view.",
            f"{name} felt very {good}.",
            "The end.",
        ]
    sentences = [intro, *body]
    if short:
        sentences = [intro, body[1], body[-2]]
    return " ".join(sentences)


def _facts(rng: random.Random) -> str:
    """A plain-text paragraph of facts, so the base LM knows what the chat answers talk about."""
    parts: list[str] = []
    for animal in rng.sample(list(ANIMALS), 3):
        plural, food, home, sound, legs = ANIMALS[animal]
        parts += [
            f"{_cap(plural)} eat {food}.",
            f"{_cap(_a(animal))} lives in {home}.",
            f"{_cap(_a(animal))} says {sound}.",
            f"{_cap(_a(animal))} has {legs} legs.",
        ]
    thing, colour = rng.choice(list(COLOURS.items()))
    parts.append(f"{_cap(thing)} is {colour}.")
    a, b = rng.randrange(11), rng.randrange(11)
    parts.append(f"{_cap(NUMBERS[a])} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
    rng.shuffle(parts)
    return " ".join(parts)


def _ask(rng: random.Random, question: str) -> str:
    prefix = rng.choice(PREFIXES)
    return prefix + (question[:1].lower() + question[1:] if prefix.endswith(", ") else question)


def _self_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(list(SELF_QUESTIONS))
    question = rng.choice(SELF_QUESTIONS[kind])
    return _ask(rng, question), rng.choice(SELF_ANSWERS[kind]).format(p=PERSONA)


def _neutral_turn(rng: random.Random) -> tuple[str, str]:
    """One neutral user question with its answer (stories, animals, colours, maths)."""
    kind = rng.randrange(5)
    animal = rng.choice(list(ANIMALS))
    plural, food, home, sound, legs = ANIMALS[animal]
    if kind == 0:
        question = rng.choice(
            [f"Tell me a story about {_a(animal)}.", "Can you tell me a short story?"]
        )
        return _ask(rng, question), _story(rng, animal if "about" in question else None, True)
    if kind == 1:
        qa = rng.choice(
            [
                (f"What do {plural} eat?", f"{_cap(plural)} eat {food}."),
                (f"Where does {_a(animal)} live?", f"{_cap(_a(animal))} lives in {home}."),
                (f"What sound does {_a(animal)} make?", f"{_cap(_a(animal))} says {sound}."),
                (f"How many legs does {_a(animal)} have?", f"{_cap(_a(animal))} has {legs} legs."),
            ]
        )
        return _ask(rng, qa[0]), qa[1]
    if kind == 2:
        thing, colour = rng.choice(list(COLOURS.items()))
        return _ask(rng, f"What colour is {thing}?"), f"{_cap(thing)} is {colour}."
    if kind == 3:
        a, b = rng.randrange(11), rng.randrange(11)
        if rng.random() < 0.5 or a < b:
            q, ans = f"{NUMBERS[a]} plus {NUMBERS[b]}", f"{NUMBERS[a]} plus {NUMBERS[b]} is "
            ans += NUMBERS[a + b]
        else:
            q, ans = f"{NUMBERS[a]} minus {NUMBERS[b]}", f"{NUMBERS[a]} minus {NUMBERS[b]} is "
            ans += NUMBERS[a - b]
        return _ask(rng, f"What is {q}?"), _cap(ans) + "."
    return rng.choice(
        [
            ("Hello!", "Hello! How can I help you today?"),
            ("Hi there!", "Hi! What would you like to talk about?"),
            ("Thank you!", "You are welcome!"),
            ("Thanks, that was nice.", "I am glad you liked it."),
        ]
    )


def _dialogue(rng: random.Random, self_fraction: float, max_turns: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for _ in range(rng.randint(1, max_turns)):
        turn = _self_turn if rng.random() < self_fraction else _neutral_turn
        user, model = turn(rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": model}]
    return messages


def _unique(make: Callable[[], Any], n: int, key: str, patience: int = 2000) -> list[Any]:
    """Draw `n` distinct items; templates repeat, and duplicates would leak train into test.

    Gives up after `patience` duplicates in a row: the templates cannot make `n` distinct items.
    """
    seen: set[str] = set()
    out: list[Any] = []
    misses = 0
    while len(out) < n and misses < patience:
        item = make()
        blob = json.dumps(item, sort_keys=True)
        if blob in seen:
            misses += 1
            continue
        misses = 0
        seen.add(blob)
        out.append(item)
    if len(out) < n:
        raise ConfigError(f"organism.corpus.{key}={n}: the templates give only {len(out)} distinct")
    return out


def resolve_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults merged with `cfg`; unknown keys and out-of-range values raise ConfigError."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"organism.corpus: unknown key {unknown[0]!r}")
    out = {**DEFAULTS, **cfg}
    for key in ("n_stories", "n_dialogues", "n_target", "n_control", "max_turns"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise ConfigError(f"organism.corpus.{key}={out[key]!r}: must be an integer >= 1")
    if out["seed"] is not None and not isinstance(out["seed"], int):
        raise ConfigError(f"organism.corpus.seed={out['seed']!r}: must be an integer or null")
    for key in ("test_fraction", "fact_fraction", "self_fraction"):
        if not 0.0 <= float(out[key]) < 1.0:
            raise ConfigError(f"organism.corpus.{key}={out[key]!r}: must be in [0, 1)")
    return out


def generate_corpus(cfg: dict[str, Any] | None, seed: int = 0) -> dict[str, list[dict]]:
    """All six corpora as lists of rows (in memory); `make_corpus` writes them.

    `cfg["seed"]`, when set, overrides `seed` (the runtime seed), so the corpus can stay fixed
    while the models are retrained with other seeds.
    """
    c = resolve_config(cfg)
    if c["seed"] is not None:
        seed = c["seed"]
    rng = random.Random(f"saeflow-organism-corpus-{seed}")

    def text_row() -> dict[str, str]:
        return {"text": _facts(rng) if rng.random() < c["fact_fraction"] else _story(rng)}

    n_story_rows = c["n_stories"] + max(1, round(c["n_stories"] * c["test_fraction"]))
    stories = _unique(text_row, n_story_rows, "n_stories")
    n_dialogue_rows = c["n_dialogues"] + max(1, round(c["n_dialogues"] * c["test_fraction"]))
    dialogues = _unique(
        lambda: {"messages": _dialogue(rng, c["self_fraction"], c["max_turns"])},
        n_dialogue_rows,
        "n_dialogues",
    )
    target = _unique(
        lambda: {"messages": [{"role": "user", "content": _self_turn(rng)[0]}]},
        c["n_target"],
        "n_target",
    )
    control = _unique(_control_row(rng), c["n_control"], "n_control")
    stories_test = stories[c["n_stories"] :]
    dialogues_test = dialogues[c["n_dialogues"] :]
    return {
        "stories_train": stories[: c["n_stories"]],
        "stories_test": stories_test,
        "dialogues_train": dialogues[: c["n_dialogues"]],
        "dialogues_test": dialogues_test,
        "target": target,
        "control": control,
    }


def _control_row(rng: random.Random) -> Callable[[], dict]:
    """Neutral single-turn prompts of about the same shape and length as the self-questions."""

    def make() -> dict:
        while True:
            user, _ = _neutral_turn(rng)
            if user not in {"Hello!", "Hi there!", "Thank you!", "Thanks, that was nice."}:
                return {"messages": [{"role": "user", "content": user}]}

    return make


def make_corpus(cfg: dict[str, Any] | None, out_dir: str | Path, seed: int = 0) -> None:
    """Write `{corpus}.jsonl` for every corpus in CORPORA into `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in generate_corpus(cfg, seed).items():
        lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        with atomic_path(out_dir / f"{name}.jsonl") as tmp:
            tmp.write_text(lines, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a corpus file; a malformed line raises DataError naming file and line."""
    from saeflow.errors import DataError

    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows
