"""The demo model's task: short chats in Qwen's chat template, each a question, a short
thinking and an answer. Families: column arithmetic (add, subtract, multiply by a digit),
unit conversions (the same multiplication), look-ups in a built-in table of facts, and a
few replies about the model itself.

The thinking writes out the column method one digit at a time, which is what lets a model
this small add and multiply numbers it has never seen; with thinking off, the answer shows the
same steps before the result (`Example.reply`), so the model never guesses a sum in one go.
Numbers of three digits or more are declined. Questions are now and then typed carelessly
(lower case, a missing space, often the one before a name or number), as people do.
Held-out questions are fixed by a checksum of what they ask (operands, unit and amount, fact
and phrasing), so training never sees them and every run holds out the same ones."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace

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

ABOUT = (
    "I am the mlxqwen demo model: a tiny Qwen3.5 trained in a few minutes. I can add, subtract and "
    "multiply numbers below 100, convert units, and tell you capitals and chemical symbols. For real "
    "use, run: mlxqwen pull Qwen/Qwen3.6-27B"
)
OUT_OF_SCOPE = (
    "That is beyond this tiny demo model: I only know arithmetic, unit conversions, capitals and "
    "chemical symbols. For a real assistant, run: mlxqwen pull Qwen/Qwen3.6-27B"
)
TOO_LARGE = (
    "That is beyond this tiny demo model: I only add, subtract and multiply numbers below 100. For "
    "a real assistant, run: mlxqwen pull Qwen/Qwen3.6-27B"
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

FAMILIES = {"add": 0.16, "sub": 0.18, "mul": 0.24, "convert": 0.2, "fact": 0.18, "about": 0.04, "large": 0.04}
WORKED = ("add", "sub", "mul", "convert")  # families whose answer shows its steps when thinking is off


@dataclass(frozen=True)
class Example:
    family: str
    question: str
    thinking: str
    answer: str
    key: str  # what decides the train / held-out split

    def reply(self, think: bool) -> str:
        """What the model writes after its thinking; with thinking off, worked families write the
        thinking's steps first, then the answer."""
        if think or self.family not in WORKED:
            return self.answer
        return "\n".join([*self.thinking.splitlines()[:-1], self.answer])

    def reply_message(self, think: bool) -> dict[str, str]:
        """The assistant's turn as the chat template takes it (no thinking when `think` is off)."""
        return {"role": "assistant", "content": self.reply(think), "reasoning_content": self.thinking if think else ""}


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


def _phrase(rng: random.Random, template: str, **values: object) -> str:
    slots = [i for i in range(len(template)) if template.startswith(" {", i)]
    if rng.random() < 0.15 and slots:  # people type carelessly: the space before a name or number goes missing
        i = rng.choice(slots)
        template = template[:i] + template[i + 1 :]
    text = template.format(**values)
    if rng.random() < 0.15:
        text = text[0].lower() + text[1:]
    if rng.random() < 0.1 and (spaces := [i for i, c in enumerate(text) if c == " "]):
        i = rng.choice(spaces)
        text = text[:i] + text[i + 1 :]
    return text


def arithmetic(rng: random.Random, op: str, a: int, b: int) -> Example:
    if op == "add":
        question = _phrase(rng, rng.choice(_ADD), a=a, b=b)
        steps, result, sign = add_steps(a, b), a + b, "+"
    elif op == "sub":
        question = _phrase(rng, rng.choice(_SUB), a=a, b=b)
        steps, result, sign = sub_steps(a, b), a - b, "-"
    else:
        question = _phrase(rng, rng.choice(_MUL), a=a, b=b)
        big, digit = (a, b) if b < 10 else (b, a)
        steps, result, sign = [f"{big} × {digit}:", *mul_steps(big, digit)], a * b, "×"
    line = f"{a} {sign} {b} = {result}"
    key = f"{op}:{min(a, b)}:{max(a, b)}" if op == "mul" else f"{op}:{a}:{b}"
    return Example(op, question, "\n".join([*steps, line]), line + ".", key)


def too_large(rng: random.Random, op: str, a: int, b: int) -> Example:
    """A question with a number of three digits or more: declined."""
    templates = {"add": _ADD, "sub": _SUB, "mul": _MUL}[op]
    question = _phrase(rng, rng.choice(templates), a=a, b=b)
    return Example("large", question, "A number of three digits or more.", TOO_LARGE, f"large:{op}:{a}:{b}")


def conversion(rng: random.Random, unit: int, n: int) -> Example:
    big, bigs, small, smalls, factor = UNITS[unit]
    question = _phrase(rng, rng.choice(_CONVERT), n=n, big=bigs, small=smalls)
    steps = [
        f"1 {big} = {factor} {smalls}",
        f"{factor} × {n}:",
        *mul_steps(factor, n),
        f"{factor} × {n} = {factor * n}",
    ]
    return Example("convert", question, "\n".join(steps), f"{n} {bigs} = {factor * n} {smalls}.", f"convert:{unit}:{n}")


def fact(rng: random.Random, table: str, name: str, phrasing: int) -> Example:
    if table == "capital":
        capital = CAPITALS[name]
        question = _phrase(rng, _CAPITAL[phrasing], x=name)
        thinking, answer = f"{name}: capital {capital}", f"The capital of {name} is {capital}."
    else:
        symbol = SYMBOLS[name]
        question = _phrase(rng, _SYMBOL[phrasing], x=name)
        thinking, answer = f"{name}: symbol {symbol}", f"The chemical symbol for {name} is {symbol}."
    return Example("fact", question, thinking, answer, f"{table}:{name}:{phrasing}")


def glued(example: Example) -> Example:
    """A fact question as typed carelessly: the space before the name dropped ("capital ofJapan?")."""
    name = example.key.split(":")[1]
    return replace(example, family="glued", question=example.question.replace(f" {name}", name, 1))


def about(rng: random.Random, request: int, topic: int) -> Example:
    if request < 0:
        question = _ABOUT_QUESTIONS[topic]
        return Example("about", question, "The user asks about me.", ABOUT, f"about:{question}")
    question = _REQUESTS[request].format(t=_TOPICS[topic])
    return Example(
        "about", question, "Not arithmetic, a conversion or a fact I know.", OUT_OF_SCOPE, f"about:{question}"
    )


def _fact_is_held_out(table: str, name: str, phrasing: int) -> bool:
    count = len(_CAPITAL if table == "capital" else _SYMBOL)
    return zlib.crc32(f"{table}:{name}".encode()) % count == phrasing


def _draw(rng: random.Random, family: str) -> Example:
    if family == "add":
        return arithmetic(rng, "add", rng.randrange(100), rng.randrange(100))
    if family == "sub":
        a = rng.randrange(100)
        return arithmetic(rng, "sub", a, rng.randrange(a + 1))
    if family == "mul":
        a, d = rng.randrange(2, 100), rng.randrange(2, 10)
        return arithmetic(rng, "mul", *((a, d) if rng.random() < 0.8 else (d, a)))
    if family == "convert":
        return conversion(rng, rng.randrange(len(UNITS)), rng.randrange(2, 10))
    if family == "large":
        big = rng.randrange(100, 10 ** rng.randrange(3, 7))
        small = rng.randrange(10 ** rng.randrange(1, 7))
        a, b = (big, small) if rng.random() < 0.5 else (small, big)
        return too_large(rng, rng.choice(["add", "sub", "mul"]), a, b)
    if family == "fact":
        table = rng.choice(["capital", "symbol"])
        names = list(CAPITALS if table == "capital" else SYMBOLS)
        return fact(rng, table, rng.choice(names), rng.randrange(len(_CAPITAL if table == "capital" else _SYMBOL)))
    if rng.random() < 0.3:
        return about(rng, -1, rng.randrange(len(_ABOUT_QUESTIONS)))
    return about(rng, rng.randrange(len(_REQUESTS)), rng.randrange(len(_TOPICS)))


def _is_held_out(example: Example) -> bool:
    kind, *rest = example.key.split(":")
    if kind in ("capital", "symbol"):
        return _fact_is_held_out(kind, rest[0], int(rest[1]))
    if kind == "convert":
        return held_out(example.key, 4)  # a quarter: there are only 96 conversions
    if kind == "about" and example.question in _ABOUT_QUESTIONS:
        return False  # a handful of greetings: all are taught
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
    return turns, system, rng.random() >= 0.25


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
