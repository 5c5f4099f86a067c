"""The built-in model: a small Qwen2 with a character-level tokenizer, built on disk
so that no download is ever needed (transformers and vLLM both load it)."""
from __future__ import annotations

from pathlib import Path

from learner.config import TinyModelConfig

SPECIAL = ["<pad>", "<eos>", "<unk>"]
# Printable ASCII plus newline and tab: one token each.
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def _byte_level(ch: str) -> str:
    """GPT-2's byte-to-unicode map for one ASCII char (space -> 'Ġ', newline -> 'Ċ')."""
    b = ord(ch)
    if 33 <= b <= 126:
        return ch
    low = [b2 for b2 in range(256) if not (33 <= b2 <= 126 or 161 <= b2 <= 172 or 174 <= b2 <= 255)]
    return chr(256 + low.index(b))


def build_tokenizer(path: Path):
    """A character-level tokenizer in Qwen2's own format (byte-level BPE with no
    merges): transformers loads any tokenizer of a qwen2 model as Qwen2Tokenizer,
    which imposes its byte-level pre-tokenizer, so a plain char vocabulary would lose
    its spaces. With this vocabulary every class reads it the same way."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [_byte_level(c) for c in CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))
    return fast


# The chat tokenizer's special tokens: its end-of-turn is not its EOS (unlike SmolLM2's),
# so a test can tell which of the two ended a completion.
CHAT_SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_chat_tokenizer(path: Path):
    """A byte-level BPE tokenizer with merges (so words are several tokens and a text can
    be split in more than one way, as with real tokenizers), a ChatML-like chat template,
    EOS `<|endoftext|>` and end-of-turn `<|im_end|>`. In Qwen2's format, as build_tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=CHAT_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chat_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _chat_corpus() -> list[str]:
    """What the chat tokenizer's merges are learnt from (all written here): the built-in
    task's prompts and completions, instruction words, a tool call."""
    texts = []
    for a in range(30):
        for b in range(30):
            texts.append(f"{a}+{b}=<think>{a % 10}+{b % 10}={a % 10 + b % 10}</think><answer>{a + b}</answer>")
    texts += ["A user asks a question and the assistant works it out. The assistant first reasons about it step "
              "by step, then states the final answer.", "system user assistant tool observation result answer think",
              "What is the sum? Add the numbers. The answer is", "<python>print(1 + 2)</python> output: 3"] * 20
    return texts


def build_tiny_model(path: str | Path, cfg: TinyModelConfig) -> Path:
    """Write a randomly initialised tiny Qwen2 model and its tokenizer to `path`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if cfg.hidden_size % cfg.num_heads or cfg.hidden_size // cfg.num_heads != 64:
        raise ValueError(
            f"model.tiny: hidden_size / num_heads must be 64 (vLLM's CPU attention), "
            f"got {cfg.hidden_size} / {cfg.num_heads}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_chat_tokenizer(path) if cfg.tokenizer == "chat_bpe" else build_tokenizer(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(path), safe_serialization=True)
    return path
