"""Build the tiny Phi-3-style tokenizer shipped in model/assets/phi3-tiny, offline and reproducibly.

It has the pipeline of microsoft/Phi-3-mini-4k-instruct's tokenizer.json (Llama-2 BPE with byte
fallback: a normalizer that prepends "▁" and turns spaces into "▁", no pre-tokenizer, a
post-processor that puts <s> first, a decoder that undoes all that) and Phi-3's 11 added chat
tokens with the same flags, but a 1024-token base vocabulary learned from a generated English
corpus, so tests and toy models need no download. Same inputs, same bytes: the corpus is built
without randomness and the trainer breaks ties between equally frequent pairs by token id (the
JSON layout itself may change between tokenizers releases; rebuild then).

    python scripts/build_tiny_tokenizer.py [--out-dir DIR]

Writes DIR/tokenizer.json and DIR/tokenizer_config.json (enough for transformers' AutoTokenizer),
and DIR/generation_config.json with Phi-3's stop tokens.
"""
import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "model" / "assets" / "phi3-tiny"
BASE_VOCAB_SIZE = 1024  # <unk>, <s>, </s>, 256 byte tokens, the corpus' characters, merges

LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
# Phi-3's added tokens in id order (32000..32010 there): (content, rstrip). All are special,
# un-normalized and without lstrip; rstrip makes a tag swallow the whitespace after it.
PHI3_ADDED_TOKENS = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
]
# microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json, current revision.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

ACTIVITIES = [
    "cook dinner", "bake bread", "make coffee", "brew tea", "plan a trip", "pack a suitcase",
    "clean the kitchen", "wash the dishes", "do the laundry", "fold clothes", "water the garden",
    "plant tomatoes", "walk the dog", "feed the cat", "read a book", "write a letter",
    "learn a new language", "practice the piano", "study for an exam", "fix a bike",
    "paint the fence", "go shopping", "buy groceries", "save money", "pay the bills",
    "sleep better", "wake up early", "run a marathon", "swim in the lake", "ride the train",
    "visit my grandmother", "call a friend", "organize the closet", "repair the roof",
    "take photos", "watch a movie", "listen to music", "sing a song", "draw a picture",
    "build a bookshelf", "change a tire", "book a hotel", "order a pizza", "set the table",
]
PLACES = [
    "the park", "the beach", "the library", "the market", "the museum", "the office",
    "the station", "the airport", "the restaurant", "the school", "the hospital", "the garden",
    "the mountains", "the city", "the village", "the river", "the bakery", "the gym",
]
TIMES = [
    "on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday",
    "on Sunday", "this morning", "this afternoon", "this evening", "tonight", "tomorrow",
    "next week", "last weekend", "in the spring", "in the summer", "in the autumn", "in the winter",
]
PEOPLE = [
    "my mother", "my father", "my sister", "my brother", "my friend", "our neighbor",
    "the teacher", "the doctor", "my daughter", "my son", "the children", "my colleague",
]
THINGS = [
    "an apple", "a sandwich", "a cup of coffee", "a warm jacket", "an umbrella", "a new phone",
    "a blue bicycle", "a small table", "a bottle of water", "a pair of shoes", "a map",
    "a notebook", "fresh vegetables", "a loaf of bread", "some flowers", "a birthday cake",
]
QUESTIONS = [
    "What is the best way to {activity}?",
    "How long does it take to {activity}?",
    "Can you help me {activity} {time}?",
    "Why do people like to {activity} {time}?",
    "Could you explain how to {activity}, step by step?",
    "Is it a good idea to {activity} near {place}?",
    "Where should I go to {activity}?",
    "Do you think {person} wants to {activity}?",
    "Should I bring {thing} to {place}?",
    "How much does {thing} cost at {place}?",
]
ANSWERS = [
    "The best way to {activity} is to start early and keep things simple.",
    "It usually takes about {minutes} minutes to {activity}.",
    "Sure! Let's {activity} together {time}.",
    "Many people enjoy it because it helps them relax after a long day.",
    "First, gather what you need. Then {activity} slowly, and check your work at the end.",
    "Yes, {place} is quiet {time}, so it's a nice place to {activity}.",
    "You could try {place}; it opens at {hour} o'clock.",
    "I think {person} would be happy to {activity} with you.",
    "Bringing {thing} is a good idea, because {place} can get busy.",
    "At {place}, {thing} costs around {minutes} dollars.",
]
STATEMENTS = [
    "Yesterday {person} went to {place} and bought {thing}.",
    "We will {activity} {time}, if the weather is nice.",
    "The weather is sunny today, but it might rain {time}.",
    "{person} said that {place} was very crowded {time}.",
    "Thank you for your help! I learned how to {activity}.",
    "Please remember to {activity} before you leave for {place}.",
]


def _fill(template: str, index: int) -> str:
    """One sentence from a template; the slot values cycle with the index, no randomness."""
    sentence = template.format(
        activity=ACTIVITIES[index % len(ACTIVITIES)],
        place=PLACES[index % len(PLACES)],
        time=TIMES[index % len(TIMES)],
        person=PEOPLE[index % len(PEOPLE)],
        thing=THINGS[index % len(THINGS)],
        minutes=10 + 5 * (index % 12),
        hour=1 + index % 12,
    )
    return sentence[0].upper() + sentence[1:]


def corpus() -> Iterator[str]:
    """A few thousand everyday English sentences: questions, answers and small talk."""
    templates = QUESTIONS + ANSWERS + STATEMENTS
    for template, index in itertools.product(templates, range(3 * len(ACTIVITIES))):
        yield _fill(template, index)


def learn_vocab_and_merges() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """BPE merges learned on ``corpus()``, split like SentencePiece: at spaces, digits apart."""
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=LLAMA_SPECIAL_TOKENS + BYTE_TOKENS,  # ids 0..258, as in Llama's vocab
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(corpus(), trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    if len(model["vocab"]) != BASE_VOCAB_SIZE:
        raise RuntimeError(
            f"the corpus supports only {len(model['vocab'])} base tokens, not {BASE_VOCAB_SIZE}"
        )
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def build_tokenizer() -> Tokenizer:
    """The tiny tokenizer: learned vocabulary inside Phi-3's tokenizer.json pipeline."""
    vocab, merges = learn_vocab_and_merges()
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True,
    ))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Prepend("▁"), normalizers.Replace(" ", "▁"),
    ])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)],
    )
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    tokenizer.add_special_tokens([
        AddedToken(content, normalized=False, special=True) for content in ("<unk>", "<s>")
    ])
    # Phi-3 marks </s> as not special (decoding keeps it) and right-stripping.
    tokenizer.add_tokens([AddedToken("</s>", rstrip=True, normalized=False, special=False)])
    tokenizer.add_special_tokens([
        AddedToken(content, rstrip=rstrip, normalized=False, special=True)
        for content, rstrip in PHI3_ADDED_TOKENS
    ])
    return tokenizer


def tokenizer_config() -> dict:
    """What transformers needs beside tokenizer.json: Phi-3's special tokens and chat template."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        # Not Phi-3's "LlamaTokenizer": in transformers 5 that class replaces tokenizer.json's
        # normalizer with its own pre-tokenizer, which drops the "▁" after every special token.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    """Phi-3's generation_config.json (eos 32000, 32001, 32007: <|endoftext|>, <|assistant|>,
    <|end|>) with the tiny tokenizer's ids of the same tokens."""
    ids = {token: tokenizer.token_to_id(token)
           for token in ("<s>", "<|endoftext|>", "<|assistant|>", "<|end|>")}
    return {"bos_token_id": ids["<s>"],
            "eos_token_id": [ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]],
            "pad_token_id": ids["<|endoftext|>"]}


def write_tiny_tokenizer(out_dir: Path) -> List[Path]:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into ``out_dir``;
    return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.json"
    config_path = out_dir / "tokenizer_config.json"
    generation_path = out_dir / "generation_config.json"
    tokenizer = build_tokenizer()
    tokenizer_path.write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config_path.write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    generation_path.write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n",
                               encoding="utf-8")
    return [tokenizer_path, config_path, generation_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    for path in write_tiny_tokenizer(parser.parse_args().out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
