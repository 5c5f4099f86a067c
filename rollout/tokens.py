"""The one tokenizer story, written once for every command (sft, distill, train, eval,
replay) and for the generators: how a prompt becomes token ids, and which tokens end a
completion.

- A prompt is rendered to text (as written, the R1-Zero instruction, or the chat
  template's user turn with the generation prompt), then tokenised once, here, by the
  driver. The generators sample from those ids and the learner trains on them: nothing
  downstream tokenises a prompt again, so "formatted identically" holds on ids.
- Chat prompts are tokenised without the tokenizer's own special tokens (the template
  writes every special token it wants, BOS included); plain prompts with them, as
  `tokenizer(text)` and vLLM do.
- A completion ends at the tokenizer's EOS, at any EOS of the model's generation config,
  or at the chat template's end-of-turn token (the token right after an assistant
  message's content), whichever the model emits. That token is part of the completion,
  so the learner trains on it and the model learns to stop; the cold start's targets end
  with it too (the end-of-turn under a chat template, EOS otherwise).
"""
from __future__ import annotations

from typing import Any

_MARK = "\u2063grpo-mark\u2063"  # content that no template rewrites


def end_of_turn_id(tok: Any) -> int | None:
    """The chat template's end-of-turn token: the first token after an assistant message's
    content, when it is a special token of the tokenizer (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`). None without a chat template, or when the template ends an assistant
    turn with ordinary text."""
    if not getattr(tok, "chat_template", None):
        return None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                                   tokenize=False)
    at = text.rfind(_MARK)
    if at < 0:
        return None
    after = tok(text[at + len(_MARK):], add_special_tokens=False)["input_ids"]
    if not after:
        return None
    special = set(getattr(tok, "all_special_ids", [])) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return after[0] if after[0] in special else None


def stop_token_ids(tok: Any, generation_eos: int | list[int] | None = None) -> list[int]:
    """Every token that ends a completion: EOS, the generation config's EOS ids, the
    template's end-of-turn (sorted, no repeats)."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    if generation_eos is not None:
        ids.update(int(i) for i in ([generation_eos] if isinstance(generation_eos, int) else generation_eos))
    eot = end_of_turn_id(tok)
    if eot is not None:
        ids.add(eot)
    return sorted(ids)


def completion_end_id(tok: Any, template: str) -> int:
    """The token a supervised target ends with: the template's end-of-turn under `chat`
    (what ends an assistant turn), EOS otherwise."""
    if template == "chat":
        eot = end_of_turn_id(tok)
        if eot is not None:
            return eot
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end completions with")
    return int(tok.eos_token_id)


def prompt_ids(tok: Any, text: str, template: str) -> list[int]:
    """A rendered prompt's token ids, as every command and the generators use them."""
    ids = tok(text, add_special_tokens=template != "chat")["input_ids"]
    if not ids:
        raise ValueError("a prompt renders to no tokens")
    return list(ids)


def observation_ids(tok: Any, text: str, template: str, role: str = "tool") -> list[int]:
    """An environment's observation as the token ids appended after a model turn, in a
    multi-turn episode (the conversation so far is never re-tokenised: these ids are
    tokenised on their own and appended to the exact ids sampled).

    - `none` / `r1_zero`: the text itself, without special tokens.
    - `chat`: the template's `role` turn (a template that refuses that role: a user turn),
      with what closes the assistant turn before it and the generation prompt after it:
      the difference between the template rendered with and without it, after an
      assistant message (`<|im_end|>\\n<|im_start|>tool\\n...<|im_end|>\\n<|im_start|>assistant\\n`
      in ChatML). The model's turn ended at a stop string, inside its message, so the
      template's end of that message is part of what the environment appends."""
    if template != "chat":
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
        rendered = None
        for r in dict.fromkeys([role, "user"]):
            try:
                rendered = tok.apply_chat_template([*before, {"role": r, "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
                break
            except Exception:  # a template that raises on an unknown role (jinja's raise_exception)
                continue
        if rendered is None or _MARK not in rendered:
            raise ValueError(f"the chat template cannot render a {role!r} or user turn after an assistant turn")
        suffix = rendered[rendered.rfind(_MARK) + len(_MARK):]
        ids = list(tok(suffix, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"an observation renders to no tokens ({text!r})")
    return ids
