"""Tokenizers for jaxgen: text ⇄ token ids, special ids and chat templates, per model.

Build one from a GGUF file (`tokenizer_from_gguf`), from an HF checkpoint directory
(`load_hf_tokenizer`) or from a directory written by `Tokenizer.save` (`load_tokenizer`). Every kind
answers the same `Tokenizer` interface, and `encode` agrees with HF's tokenizer for the same files.
This package knows nothing about models, weights or the serving loop.
"""

from jaxgen.tokenizer.base import Tokenizer
from jaxgen.tokenizer.bpe import BPETokenizer
from jaxgen.tokenizer.chat_template import GEMMA_CHAT_TEMPLATE, ChatTemplateError, render_chat_template
from jaxgen.tokenizer.detokenizer import IncrementalDetokenizer
from jaxgen.tokenizer.directory import load_hf_tokenizer, load_tokenizer
from jaxgen.tokenizer.gguf_loader import tokenizer_from_gguf
from jaxgen.tokenizer.sentencepiece import SentencePieceTokenizer
from jaxgen.tokenizer.settings import TokenizerSettings
from jaxgen.tokenizer.stop_strings import StopStringMatcher

__all__ = [
    "BPETokenizer",
    "ChatTemplateError",
    "GEMMA_CHAT_TEMPLATE",
    "IncrementalDetokenizer",
    "SentencePieceTokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "TokenizerSettings",
    "load_hf_tokenizer",
    "load_tokenizer",
    "render_chat_template",
    "tokenizer_from_gguf",
]
