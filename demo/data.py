"""The demo model's task: short chats in Qwen's chat template, each a question, a short
thinking and an answer. Families: column arithmetic (add and subtract numbers below 1,000,
multiply one by a digit), unit conversions (2 to 9 units: the same multiplication), look-ups
in a built-in table of facts, a few replies about the model itself, and declines: numbers
beyond that range, countries and elements not in the table, and anything else.

With thinking on, the thinking writes out the column method one digit at a time, which is
what lets a model this small add and multiply numbers it has never seen, and the answer is
the result. With thinking off, the answer shows the same steps on one line before the result
(`Example.plain`): the model never has to guess a sum in one go. Questions are now and then
typed carelessly (lower case, a missing space or question mark), as people do. Held-out
questions are fixed by a checksum of what they ask (operands, unit and amount, fact and
phrasing, unknown name), so training never sees them and every run holds out the same ones."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Australia": "Canberra",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Iran": "Tehran",
    "Cuba": "Havana",
    "Ukraine": "Kyiv",
    "South Korea": "Seoul",
}

SYMBOLS = {
    "hydrogen": "H",
    "helium": "He",
    "lithium": "Li",
    "carbon": "C",
    "nitrogen": "N",
    "oxygen": "O",
    "fluorine": "F",
    "neon": "Ne",
    "sodium": "Na",
    "magnesium": "Mg",
    "aluminium": "Al",
    "silicon": "Si",
    "phosphorus": "P",
    "sulfur": "S",
    "chlorine": "Cl",
    "argon": "Ar",
    "potassium": "K",
    "calcium": "Ca",
    "iron": "Fe",
    "copper": "Cu",
    "zinc": "Zn",
    "silver": "Ag",
    "tin": "Sn",
    "iodine": "I",
    "gold": "Au",
    "mercury": "Hg",
    "lead": "Pb",
    "uranium": "U",
    "nickel": "Ni",
    "titanium": "Ti",
}

# (unit, plural, smaller unit, plural, how many smaller units make one unit)
UNITS = [
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("meter", "meters", "millimeter", "millimeters", 1000),
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("liter", "liters", "milliliter", "milliliters", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
    ("foot", "feet", "inch", "inches", 12),
    ("yard", "yards", "foot", "feet", 3),
]

# Names the tables do not hold: the model says it does not know them (a few made-up ones too).
OTHER_COUNTRIES = ["Chad", "Bolivia", "Nepal", "Iceland", "Ghana", "Kuwait", "Qatar", "Syria", "Iraq", "Mali",
                   "Niger", "Libya", "Tunisia", "Algeria", "Senegal", "Uganda", "Zambia", "Angola", "Ethiopia",
                   "Somalia", "Sudan", "Yemen", "Oman", "Jordan", "Lebanon", "Pakistan", "Bangladesh", "Myanmar",
                   "Cambodia", "Laos", "Malaysia", "Philippines", "Mongolia", "Kazakhstan", "Georgia", "Armenia",
                   "Latvia", "Lithuania", "Estonia", "Romania", "Bulgaria", "Serbia", "Croatia", "Slovakia",
                   "Venezuela", "Colombia", "Ecuador", "Uruguay", "Paraguay", "Panama", "Jamaica", "New Zealand",
                   "North Korea", "Atlantis", "Wakanda", "Narnia", "Mordor", "Mars"]  # fmt: skip
OTHER_ELEMENTS = ["boron", "beryllium", "manganese", "cobalt", "chromium", "platinum", "tungsten", "bismuth",
                  "radon", "xenon", "krypton", "bromine", "selenium", "arsenic", "germanium", "gallium", "cesium",
                  "strontium", "barium", "plutonium", "radium", "cadmium", "lanthanum", "vanadium",
                  "kryptonite", "vibranium", "unobtainium", "adamantium"]  # fmt: skip

LIMIT = 1000  # operands of + and - below it; × takes one of them times a digit
PULL = "For real use, run: mlxqwen pull Qwen/Qwen3.6-27B"
ABOUT = (
    "I am the mlxqwen demo model: a tiny Qwen3.5 trained in a few minutes. I add and subtract numbers "
    f"below 1,000, multiply them by a digit, convert 2 to 9 units, and know {len(CAPITALS)} capitals and "
    f"{len(SYMBOLS)} chemical symbols. {PULL}"
)
OUT_OF_SCOPE = (
    "That is beyond this tiny demo model: I only know arithmetic, unit conversions, capitals and "
    "chemical symbols. For a real assistant, run: mlxqwen pull Qwen/Qwen3.6-27B"
)
TOO_BIG = (
    f"That is beyond this tiny demo model: I add and subtract numbers below 1,000 and multiply them by a digit. {PULL}"
)
TOO_MANY_UNITS = f"That is beyond this tiny demo model: I convert 2 to 9 units at a time. {PULL}"
UNKNOWN = (
    f"I don't know that one: this tiny demo model knows {len(CAPITALS)} capitals and {len(SYMBOLS)} "
    f"chemical symbols. {PULL}"
)

_ADD = ["What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?", "{a}+{b}",
        "Add {a} and {b}.", "What's the sum of {a} and {b}?"]  # fmt: skip
_SUB = ["What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?", "{a}-{b}",
        "Subtract {b} from {a}.", "What's {a} take away {b}?"]  # fmt: skip
_MUL = ["What is {a} × {b}?", "What is {a} * {b}?", "What is {a} times {b}?", "Calculate {a} * {b}.", "{a}*{b}",
        "Multiply {a} by {b}.", "{a} x {b} = ?"]  # fmt: skip
_CONVERT = ["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.", "{n} {big} in {small}?",
            "How many {small} is {n} {big}?", "What is {n} {big} in {small}?"]  # fmt: skip
_CAPITAL = ["What is the capital of {x}?", "What's the capital city of {x}?", "Which city is the capital of {x}?",
            "Name the capital of {x}.", "Tell me the capital of {x}.", "capital of {x}?"]  # fmt: skip
_SYMBOL = ["What is the chemical symbol for {x}?", "What's the symbol of {x}?", "Which symbol does {x} have?",
           "Give the chemical symbol of {x}.", "symbol for {x}?", "How do chemists write {x}?"]  # fmt: skip
_ABOUT_QUESTIONS = ["Hi", "Hello", "Hello!", "Hey", "hi there", "Good morning", "Who are you?", "What are you?",
                    "What can you do?", "help", "Help me", "What is your name?", "Are you a real model?"]  # fmt: skip
_REQUESTS = ["Write a poem about {t}.", "Explain {t}.", "Tell me about {t}.", "What do you think of {t}?",
             "Can you help me with {t}?", "How does {t} work?", "Write an email about {t}.", "Summarize {t}.",
             "Give me advice on {t}."]  # fmt: skip
_TOPICS = ["the sea", "love", "quantum physics", "my homework", "cooking pasta", "the stock market", "football",
           "a trip to Japan", "my cat", "machine learning", "the weather", "history", "music", "gardening",
           "taxes", "the moon", "climate change", "a job interview", "chess", "painting", "the French revolution",
           "sleep", "coffee", "Python code", "a birthday party", "electric cars", "my garden",
           "philosophy"]  # fmt: skip
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant.", "Answer briefly."]

FAMILIES = {"add": 0.15, "sub": 0.15, "mul": 0.22, "convert": 0.12, "fact": 0.16, "about": 0.04, "decline": 0.16}
THINKING_OFF = 0.35  # share of training chats without thinking


@dataclass(frozen=True)
class Example:
    family: str
    question: str
    thinking: str
    answer: str  # with thinking on
    key: str  # what decides the train / held-out split
    plain: str = ""  # the answer with thinking off: the steps on one line, then the answer (default: `answer`)

    def reply(self, think: bool) -> str:
        return self.answer if think or not self.plain else self.plain


def held_out(key: str, share: int = 10) -> bool:
    """One key in `share` is held out, by a checksum that is the same on every machine."""
    return zlib.crc32(key.encode()) % share == 0


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)[::-1]]  # ones first


def add_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width), strict=True)):
        total = x + y + carry
        step = f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}"
        carry = total // 10 if i < width - 1 else 0
        steps.append(step + (", carry 1" if carry else ""))
    return steps


def sub_steps(a: int, b: int) -> list[str]:
    """a - b for a >= b."""
    width = len(str(a))
    steps, borrow = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        less = f" - {borrow}" if borrow else ""
        if x - borrow < y:
            steps.append(f"{10 + x} - {y}{less} = {10 + x - y - borrow}, borrow 1")
            borrow = 1
        else:
            steps.append(f"{x} - {y}{less} = {x - y - borrow}")
            borrow = 0
    return steps


def mul_steps(a: int, d: int) -> list[str]:
    """a × d for a single digit d: each column a times-table fact, then the carry added
    (one step each: a small model gets "8 × 7 + 6" wrong far more often than "56 + 6")."""
    width = len(str(a))
    steps, carry = [], 0
    for i, x in enumerate(_digits(a, width)):
        product = x * d
        step = f"{x} × {d} = {product}" + (f", {product} + {carry} = {product + carry}" if carry else "")
        carry = (product + carry) // 10 if i < width - 1 else 0
        steps.append(step + (f", carry {carry}" if carry else ""))
    return steps


def _one_line(steps: list[str], result: str) -> str:
    """The steps of a thinking as one answer line: `98 × 7: 8 × 7 = 56, carry 5; ...; so 98 × 7 = 686.`"""
    text = ""
    for step in steps:
        text += step + (" " if step.endswith(":") else "; ")
    return f"{text}so {result}."


def _careless(rng: random.Random, text: str) -> str:
    """Now and then, typed as people type: lower case, a missing space, no question mark."""
    r = rng.random()
    if r < 0.12:
        text = text[0].lower() + text[1:]
    elif r < 0.16:
        text = text.lower()
    if rng.random() < 0.1 and " " in text:
        i = rng.choice([i for i, c in enumerate(text) if c == " "])
        text = text[:i] + text[i + 1 :]
    if rng.random() < 0.05 and text[-1] in "?.":
        text = text[:-1]
    return text


def _question(rng: random.Random, templates: list[str], **values: object) -> str:
    return _careless(rng, rng.choice(templates).format(**values))


def arithmetic(rng: random.Random, op: str, a: int, b: int) -> Example:
    """a + b, a - b (negative too) or a × b, by the column method; beyond the range, a decline."""
    templates, sign = {"add": (_ADD, "+"), "sub": (_SUB, "-"), "mul": (_MUL, "×")}[op]
    question = _question(rng, templates, a=a, b=b)
    key = f"{op}:{min(a, b)}:{max(a, b)}" if op == "mul" else f"{op}:{a}:{b}"
    big = [n for n in (a, b) if n >= LIMIT]
    if big or (op == "mul" and min(a, b) >= 10):
        why = f"{big[0]} has {len(str(big[0]))} digits." if big else f"Neither {a} nor {b} is a single digit."
        return Example("decline", question, why, TOO_BIG, "big:" + key)
    if op == "add":
        steps, result = add_steps(a, b), a + b
    elif op == "sub" and a >= b:
        steps, result = sub_steps(a, b), a - b
    elif op == "sub":
        steps, result = [f"{a} < {b}, so {b} - {a} first:", *sub_steps(b, a), f"{b} - {a} = {b - a}"], a - b
    else:
        big, digit = (a, b) if b < 10 else (b, a)
        steps, result = [f"{big} × {digit}:", *mul_steps(big, digit)], a * b
    line = f"{a} {sign} {b} = {result}"
    return Example(op, question, "\n".join([*steps, line]), line + ".", key, _one_line(steps, line))


def conversion(rng: random.Random, unit: int, n: int) -> Example:
    big, bigs, small, smalls, factor = UNITS[unit]
    question = _question(rng, _CONVERT, n=n, big=bigs, small=smalls)
    if not 2 <= n <= 9:
        return Example("decline", question, f"{n} {bigs}: not 2 to 9.", TOO_MANY_UNITS, f"units:{unit}:{n}")
    steps = [f"1 {big} = {factor} {smalls}", f"{factor} × {n}:", *mul_steps(factor, n)]
    line = f"{n} {bigs} = {factor * n} {smalls}"
    thinking = "\n".join([*steps, f"{factor} × {n} = {factor * n}"])
    return Example("convert", question, thinking, line + ".", f"convert:{unit}:{n}", _one_line(steps, line))


def fact(rng: random.Random, table: str, name: str, phrasing: int) -> Example:
    templates = _CAPITAL if table == "capital" else _SYMBOL
    question = _careless(rng, templates[phrasing].format(x=name))
    known = CAPITALS if table == "capital" else SYMBOLS
    if name not in known:
        return Example("decline", question, f"{name}: not in my table.", UNKNOWN, f"unknown:{table}:{name}")
    if table == "capital":
        thinking, answer = f"{name}: capital {known[name]}", f"The capital of {name} is {known[name]}."
    else:
        thinking, answer = f"{name}: symbol {known[name]}", f"The chemical symbol for {name} is {known[name]}."
    return Example("fact", question, thinking, answer, f"{table}:{name}:{phrasing}")


def about(rng: random.Random, request: int, topic: int) -> Example:
    if request < 0:
        question = _careless(rng, _ABOUT_QUESTIONS[topic])
        return Example("about", question, "The user asks about me.", ABOUT, f"about:{question}")
    question = _careless(rng, _REQUESTS[request].format(t=_TOPICS[topic]))
    return Example(
        "decline", question, "Not arithmetic, a conversion or a fact I know.", OUT_OF_SCOPE, f"about:{question}"
    )


def _fact_is_held_out(table: str, name: str, phrasing: int) -> bool:
    count = len(_CAPITAL if table == "capital" else _SYMBOL)
    return zlib.crc32(f"{table}:{name}".encode()) % count == phrasing


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _draw(rng: random.Random, family: str) -> Example:
    """An example of `family`; a decline is one of: numbers beyond the range, too many units, a
    name the tables lack, a request beyond the task."""
    if family in ("add", "sub"):
        return arithmetic(rng, family, _number(rng, rng.randint(1, 3)), _number(rng, rng.randint(1, 3)))
    if family == "mul":
        a, d = _number(rng, rng.randint(1, 3)), rng.randrange(10)
        return arithmetic(rng, "mul", *((a, d) if rng.random() < 0.7 else (d, a)))
    if family == "convert":
        return conversion(rng, rng.randrange(len(UNITS)), rng.randrange(2, 10))
    if family == "fact":
        table = rng.choice(["capital", "symbol"])
        names = list(CAPITALS if table == "capital" else SYMBOLS)
        return fact(rng, table, rng.choice(names), rng.randrange(len(_CAPITAL if table == "capital" else _SYMBOL)))
    if family == "about":
        return about(rng, -1, rng.randrange(len(_ABOUT_QUESTIONS)))
    kind = rng.choices(["big", "units", "unknown", "request"], weights=[0.35, 0.1, 0.3, 0.25])[0]
    if kind == "big":
        op = rng.choice(["add", "sub", "mul"])
        if op == "mul" and rng.random() < 0.4:  # two numbers of several digits
            return arithmetic(rng, op, _number(rng, rng.randint(2, 3)), _number(rng, rng.randint(2, 3)))
        pair = [_number(rng, rng.randint(4, 7)), _number(rng, rng.randint(1, 7))]
        rng.shuffle(pair)
        return arithmetic(rng, op, *pair)
    if kind == "units":
        return conversion(rng, rng.randrange(len(UNITS)), _number(rng, rng.randint(2, 3)))
    if kind == "unknown":
        table = rng.choice(["capital", "symbol"])
        names = OTHER_COUNTRIES if table == "capital" else OTHER_ELEMENTS
        return fact(rng, table, rng.choice(names), rng.randrange(len(_CAPITAL if table == "capital" else _SYMBOL)))
    return about(rng, rng.randrange(len(_REQUESTS)), rng.randrange(len(_TOPICS)))


def _is_held_out(example: Example) -> bool:
    kind, *rest = example.key.split(":")
    if kind in ("capital", "symbol"):
        return _fact_is_held_out(kind, rest[0], int(rest[1]))
    if kind == "convert":
        return held_out(example.key, 4)  # a quarter: there are only 96 conversions
    if kind == "unknown":
        return held_out(example.key, 5)  # names never seen: the model must know what it knows
    if kind == "about" and example.question in _ABOUT_QUESTIONS:
        return False  # a handful of greetings: all are taught as written, some typed otherwise held out
    return held_out(example.key)


def sample(rng: random.Random, family: str | None = None, split: str = "train") -> Example:
    """A random example of `family` (default: drawn by FAMILIES' weights) from the split."""
    family = family or rng.choices(list(FAMILIES), weights=list(FAMILIES.values()))[0]
    while True:
        example = _draw(rng, family)
        if _is_held_out(example) == (split == "test"):
            return example


def conversation(rng: random.Random) -> tuple[list[Example], str | None, bool]:
    """A training chat: one or two exchanges, an optional system prompt, thinking on or off."""
    turns = [sample(rng) for _ in range(2 if rng.random() < 0.15 else 1)]
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.1 else None
    return turns, system, rng.random() >= THINKING_OFF


def test_set(per_family: int, seed: int = 1234) -> list[Example]:
    """Held-out questions, up to `per_family` different ones of each family (fewer where fewer
    are held out), none of which training sees."""
    rng = random.Random(seed)
    examples: dict[str, Example] = {}
    for family in FAMILIES:
        found = 0
        for _ in range(50 * per_family):
            example = sample(rng, family, "test")
            if example.key not in examples:
                examples[example.key] = example
                found += 1
                if found == per_family:
                    break
    return list(examples.values())
