"""Generate the example chat data reproducibly: examples/chat.jsonl and examples/chat_eval.jsonl.

Small, regular tasks (arithmetic, capitals, opposites, colours, spelling) that the
tiny default model can visibly learn in a minute on a CPU. Same output every run.

    python scripts/make_chat_data.py
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly and correctly.",
                  "You are a friendly tutor."]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima",
            "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi", "Greece": "Athens"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late",
             "light": "dark", "open": "closed", "full": "empty", "old": "new", "up": "down"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
           "coal": "black", "a tomato": "red", "an orange": "orange", "a plum": "purple"}
WORDS = ["cat", "house", "river", "apple", "garden", "music", "window", "pencil", "cloud", "bread"]


def arithmetic(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


def colour(rng):
    thing = rng.choice(sorted(COLOURS))
    return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLOURS[thing]}."


def spelling(rng):
    word = rng.choice(WORDS)
    return f"How do you spell {word}?", f"{word} is spelled {'-'.join(word.upper())}."


TASKS = [arithmetic, capital, opposite, colour, spelling]


def conversation(rng) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice([1, 1, 2])):
        question, answer = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            out.write(json.dumps(conversation(rng)) + "\n")


if __name__ == "__main__":
    write(ROOT / "examples" / "chat.jsonl", 600, seed=0)
    write(ROOT / "examples" / "chat_eval.jsonl", 60, seed=1)
    print("wrote examples/chat.jsonl (600) and examples/chat_eval.jsonl (60)")
