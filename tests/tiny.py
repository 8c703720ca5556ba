"""Tiny offline models for tests: a random 2-layer Llama / Qwen2 and a small fast tokenizer.

    from tests.tiny import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer("llama")            # ChatML template, eos <|im_end|>
    model, tok = tiny_model_and_tokenizer("qwen2", no_template=True)  # plain concatenation

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory (~0.1 s) on a small
built-in corpus, so every string (any Unicode) can be encoded. Models are float32, eval mode,
hidden size 32, 2 layers, vocab = len(tokenizer), deterministic for a given seed.
"""
import functools

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Berlin is the capital of Germany. Madrid is the capital of Spain.",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "The quick brown fox jumps over the lazy dog. 1. First item\n2. Second item",
    "Dr. Smith met Mr. Jones, e.g. at the U.S. embassy, at 3.14 pm... Really? Yes!",
    "def add(a, b):\n    return a + b\n```python\nprint(add(2, 3))\n```",
    "I think the answer is 4. Two plus two equals four. It is not five.",
    "user assistant system hello world good bad reward model language sentence token",
    "中文句子。你好！是吗？ Ünïcödé and émojis 🙂 are fine.",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tk.to_str()


def tiny_tokenizer(*, no_template: bool = False, padding_side: str = "right"):
    """A fast (byte-level BPE) tokenizer: eos/pad/bos as ChatML; ChatML chat template unless
    `no_template`. The vocabulary size is len(tokenizer) (~400)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<|endoftext|>",
                                  padding_side=padding_side)
    if not no_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(arch: str = "llama", *, vocab_size: int, seed: int = 0, hidden_size: int = 32,
               num_layers: int = 2, tie: bool = False):
    """A randomly initialised LlamaForCausalLM / Qwen2ForCausalLM in float32 eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
              num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1,
              eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = Qwen2Config(**kw), Qwen2ForCausalLM
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # larger weights than the default init: rewards far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.float().eval()


def tiny_model_and_tokenizer(arch: str = "llama", seed: int = 0, *, no_template: bool = False,
                             padding_side: str = "right", tie: bool = False):
    """(model, tokenizer): a tiny random `arch` ("llama" | "qwen2") model and a fast tokenizer
    with a ChatML template (eos "<|im_end|>", pad "<pad>"); `no_template=True` drops the
    template so prompts and responses are concatenated; `tie=True` ties the LM head to the
    input embeddings."""
    tok = tiny_tokenizer(no_template=no_template, padding_side=padding_side)
    model = tiny_model(arch, vocab_size=len(tok), seed=seed, tie=tie)
    return model, tok


# Preference pairs with several sentences per response, for the SentenceRM tests.
SRM_PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "Berlin is the capital of Germany. Madrid is the capital of Spain."},
    {"prompt": "Hi", "chosen": "Hello world. Second sentence!", "rejected": "Bad. Good."},
    {"prompt": "What is 2+2?", "chosen": "Two plus two equals four. It is not five.",
     "rejected": "I think the answer is 5."},
    {"prompt": "Tell me a story.", "chosen": "The quick brown fox jumps over the lazy dog.",
     "rejected": "The lazy dog. The fox!"},
]
