"""Text the converter measures models on, written for this project.

- `TEXT`: the quality report's held-out text, about a thousand tokens of the kinds of text a
  local Qwen model is asked for (explanations, chat, code, arithmetic, structured data, Chinese).
- `calibration_chats.json`: the calibration set that bit budgets and calibrated rounding learn
  from: conversations with thinking, tool calls and tool results (prose, code, arithmetic, SQL,
  JSON, Chinese, French, German, Spanish), rendered with the checkpoint's own chat template, so
  that the model sees them as it does in use. `--calibration FILE` replaces them with the user's
  own text. Calibration and report never share text, so the report measures held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlxqwen.errors import ConvertError, option
from mlxqwen.tokenizer import Tokenizer

CHATS = Path(__file__).with_name("calibration_chats.json")
SEQUENCE = 512  # tokens per calibration sequence
MAX_SEQUENCES = 8


def shipped_text(tokenizer: Tokenizer) -> str:
    """The shipped conversations as the model reads them: through its chat template, or as plain
    text for a model without one (a base model)."""
    chats = json.loads(CHATS.read_text())
    if tokenizer.chat_template is None:
        return "\n\n".join(m["content"] for chat in chats for m in chat["messages"] if m["content"])
    render = tokenizer.chat_template.render
    return "".join(render(c["messages"], tools=c.get("tools"), add_generation_prompt=False) for c in chats)


def user_text(file: str | Path, flag: str = "calibration") -> str:
    """The text of `--calibration FILE` (or another `flag`): UTF-8, not empty."""
    path, said = Path(file).expanduser(), option(flag, file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvertError(f"{said}: no such file") from None
    except IsADirectoryError:
        raise ConvertError(f"{said}: is a directory; give a UTF-8 text file") from None
    except UnicodeDecodeError:
        raise ConvertError(f"{said}: not UTF-8 text; give a UTF-8 text file") from None
    except OSError as e:
        raise ConvertError(f"{said}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ConvertError(f"{said}: the file is empty; give it some text in the model's domain")
    return text


def check_tokens(tokens: list[int], directory: Path, vocab_size: int) -> list[int]:
    if tokens and max(tokens) >= vocab_size:
        raise ConvertError(
            f"{directory / 'tokenizer.json'}: token id {max(tokens)} is outside the model's vocabulary "
            f"({vocab_size}); the tokenizer does not belong to this model"
        )
    return tokens


def calibration_batch(directory: Path, vocab_size: int, file: str | Path | None = None) -> mx.array:
    """The calibration text in the tokens of the checkpoint at `directory`, as up to
    MAX_SEQUENCES sequences of SEQUENCE tokens [B, T] (one shorter sequence if the text is short)."""
    tokenizer = Tokenizer.from_dir(directory)
    tokens = check_tokens(tokenizer.encode(user_text(file) if file else shipped_text(tokenizer)), directory, vocab_size)
    if len(tokens) < 2:
        raise ConvertError(f"{option('calibration', file)}: too short; it needs at least a sentence")
    length = min(SEQUENCE, len(tokens))
    count = min(MAX_SEQUENCES, len(tokens) // length)
    return mx.array(tokens[: count * length]).reshape(count, length)


TEXT = """\
The water cycle moves water between the oceans, the air and the land. Sunlight warms the surface \
of the sea, and some of the water evaporates into vapour that rises with the warm air. As the air \
climbs it cools, and the vapour condenses around tiny particles of dust and salt to form clouds. \
When the droplets grow heavy enough they fall as rain or snow. Part of that water runs off into \
rivers and back to the sea, part soaks into the ground and refills aquifers, and part is taken up \
by plants, which release it again through their leaves. A single molecule may spend days in the \
atmosphere, centuries in a deep aquifer, or thousands of years locked in a glacier.

User: Can you explain what a hash map is, in two or three sentences?
Assistant: A hash map stores key-value pairs in an array of buckets. It runs each key through a \
hash function to pick a bucket, so looking up, inserting or deleting a key takes constant time on \
average. When two keys land in the same bucket, the map resolves the collision, for example by \
keeping a short list in that bucket.

User: Write a Python function that returns the n-th Fibonacci number without recursion.
Assistant: Here is an iterative version that runs in linear time and constant memory:

```python
def fibonacci(n: int) -> int:
    if n < 0:
        raise ValueError("n must be non-negative")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


print([fibonacci(i) for i in range(10)])  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
```

A train leaves the station at 9:40 and travels 270 kilometres at an average speed of 90 \
kilometres per hour. The journey takes 270 / 90 = 3 hours, so it arrives at 12:40. If it stops \
twice for 8 minutes each, it arrives 16 minutes later, at 12:56. The area of a circle with a \
radius of 3 cm is pi * 3^2, about 28.27 square centimetres, and its circumference is 2 * pi * 3, \
about 18.85 cm.

{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius", "days": 3}}
The forecast for Lisbon shows 21 degrees and sunshine on Monday, light rain on Tuesday, and a \
cooler, windy Wednesday with a high of 17 degrees.

长城是中国古代的军事防御工程，东西绵延上万里。它的修建持续了两千多年，从春秋战国时期开始，\
到明朝时达到规模最大的阶段。今天，长城不仅是重要的历史遗迹，也是世界上最受欢迎的旅游景点之一。\
每年都有数以百万计的游客前来参观，感受古人的智慧和力量。

Checklist before a long hike:
1. Check the weather forecast and the time of sunset.
2. Pack water, food, a map, a light jacket and a small first-aid kit.
3. Tell someone where you are going and when you expect to be back.
4. Wear shoes that are already broken in, and carry a spare pair of socks.

In 1859, Charles Darwin published On the Origin of Species, arguing that populations change over \
generations through natural selection: individuals whose traits suit their environment leave more \
offspring, and those traits become more common. The idea met fierce resistance at first, but the \
discovery of genes and, later, of the structure of DNA gave it a mechanism, and today evolution is \
the organising principle of modern biology.

User: Translate "Where is the nearest train station?" into French and Spanish.
Assistant: French: « Où est la gare la plus proche ? » Spanish: «¿Dónde está la estación de tren \
más cercana?»

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue
FROM orders
WHERE created_at >= '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 5
ORDER BY revenue DESC
LIMIT 10;

The query lists the ten customers with the highest revenue among those who placed more than five \
orders since the start of 2024. An index on created_at lets the database skip older rows, and \
the grouping then needs a single pass over the remaining ones.
"""
