"""Text <-> token ids for a checkpoint: a sentencepiece `tokenizer.model` (Llama, Mistral) or a
Hugging Face `tokenizer.json` (byte-level BPE models such as SmolLM2), behind one small class.

The special ids come from the files beside the tokenizer: sentencepiece models carry their own;
for tokenizer.json they are read from config.json (bos_token_id, eos_token_id) or
tokenizer_config.json (bos_token, eos_token).
"""
import json
from pathlib import Path

from longheads import need


class Tokenizer:
    def __init__(self, path):
        path = Path(path)
        file = find_tokenizer(path)
        self.directory = file.parent
        if file.suffix == ".model":
            self._load_sentencepiece(file)
        else:
            self._load_json(file)

    def _load_sentencepiece(self, file):
        import sentencepiece
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{file} is not a sentencepiece model ({e})") from None
        self.tok = None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # -1: the model has none
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.vocab_size()

    def _load_json(self, file):
        import tokenizers
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{file} is not a tokenizers JSON file ({e})") from None
        self.sp = None
        settings = read_json_if_any(file.parent / "tokenizer_config.json")
        config = read_json_if_any(file.parent / "config.json")
        bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
        self.bos_id = bos if bos is not None else self._token_id(settings.get("bos_token"))
        self.eos_id = eos if eos is not None else self._token_id(settings.get("eos_token"))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token):
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config files
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text, bos=None):
        """text -> list of ids. bos=None does what the model's own tokenizer does: sentencepiece
        Llamas start with BOS, a tokenizer.json adds what its post-processor says."""
        if self.sp is None and bos is None:
            return self.tok.encode(text).ids
        if self.sp:
            ids = self.sp.encode(text)
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        add = bos if bos is not None else self.bos_id is not None
        return [self.bos_id] + ids if add and self.bos_id is not None else ids

    def continuation(self, text):
        """The ids of text as they come in the middle of a longer text (no BOS, and no extra
        space token: a sentencepiece model would otherwise add its word-start marker again).
        The text is encoded after a head that is then cut off: "x", or where text starts
        mid-word and would merge with it ("tle ones"), a line break."""
        for head_text in ("x", "\n"):
            head = self.encode(head_text, bos=False)
            ids = self.encode(head_text + text, bos=False)
            if ids[:len(head)] == head:
                return ids[len(head):]
        raise ValueError(f"cannot tokenize {text!r} as a continuation: it merges with any "
                         f"text before it")

    def decode(self, ids):
        """A list or tensor of ids -> text; a 2-D tensor: generate's (1, T) for one prompt."""
        if getattr(ids, "ndim", 1) == 2:
            need(len(ids) == 1, f"decode takes one sequence, got ids of shape {tuple(ids.shape)}: "
                 f"decode each row, [tokenizer.decode(row) for row in ids]")
            ids = ids[0]
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.sp else self.tok.decode(ids, skip_special_tokens=False)


def find_tokenizer(path):
    """A tokenizer file, or the one in a checkpoint directory (tokenizer.model first)."""
    if path.is_file() and path.suffix in (".model", ".json"):
        return path
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json; give a checkpoint "
                            f"directory that has one, or the file itself")


def read_json_if_any(file):
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
