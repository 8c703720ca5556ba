"""What every `erm` command shares: the one set of model options (`model_options`, checked by
`check_model_options` before any model loads), the user error (`CLIError`, exit status 2),
output-path checks and atomic writes, and the status/warning lines on stderr."""
import argparse
import contextlib
import errno
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .. import jsonio
from .._checks import check_alpha, check_gamma

EXIT_USAGE = 2


class CLIError(Exception):
    """An error reported to the user as one line, exit status 2."""


def log(args, msg: str) -> None:
    """A status line on stderr ("erm: msg"), unless -q."""
    if not getattr(args, "quiet", False):
        print(f"erm: {msg}", file=sys.stderr)


def warn(msg: str) -> None:
    """A warning line on stderr ("erm: warning: msg"), even with -q."""
    print(f"erm: warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- model options

MODEL_OPTIONS = ("model", "system_prompt", "alpha", "gamma", "device", "device_map", "dtype",
                 "batch_size", "max_length", "no_truncate")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _alpha(text: str) -> float:
    try:
        return check_alpha(float(text), "alpha")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gamma(text: str) -> float:
    try:
        return check_gamma(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_HELP = {
    "model": "Hugging Face model name, local directory or .gguf file (default: the embedded "
             "SmolLM2-135M-Instruct)",
    "system_prompt": "system message put in the context of every prompt (default: the "
                     "model's own)",
    "alpha": "temperature α of the soft values and log-probs: finite, at least 1e-4 (default "
             "1.0; erm rl: the sampling --temperature)",
    "gamma": "discount γ of the endogenous reward, finite (default 1.0)",
    "device": "torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    "device_map": "load the model across all visible GPUs with transformers' device_map (a "
                  "model larger than one GPU; auto is the usual choice); instead of --device",
    "dtype": "model dtype (default: bfloat16 on CUDA, float32 on CPU)",
    "batch_size": "pairs per forward pass, at least 1",
    "max_length": "longest sequence in tokens (prompt + response), at least 2, capped by the "
                  "model's context; a longer prompt is cut from the left (see --no-truncate)",
    "no_truncate": "a prompt that does not fit in --max-length is an error naming it (erm "
                   "serve: a 422 answer) instead of being cut from the left",
}
_SRM_MODEL = ", or a SentenceRM directory saved by erm train-srm"
_REPEAT_MODEL = ("; repeat it to add several SentenceRM columns (named srm_<aggregate>) beside "
                 "at most one EndoRM model")


def model_options(p: argparse.ArgumentParser, names=MODEL_OPTIONS, *, srm: bool = False,
                  repeat_model: bool = False, defaults=None) -> None:
    """Add the model options `names` (a subset of MODEL_OPTIONS, dest names) to `p` in a "model"
    group. Every option defaults to None ("the model's own"; --no-truncate to False) unless
    `defaults` ({dest: value}) gives one; `srm`: --model may name a SentenceRM directory;
    `repeat_model`: --model may be given several times (a list)."""
    defaults = defaults or {}
    unknown = set(names) - set(MODEL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; choose from {MODEL_OPTIONS}")
    g = p.add_argument_group("model")
    for name in MODEL_OPTIONS:
        if name not in names:
            continue
        flag, default = "--" + name.replace("_", "-"), defaults.get(name)
        text = _HELP[name] + (f" (default: {default})" if default is not None else "")
        if name == "model":
            text = _HELP[name] + (_SRM_MODEL if srm else "") + (_REPEAT_MODEL if repeat_model
                                                                 else "")
            g.add_argument(flag, metavar="PATH", action="append" if repeat_model else "store",
                           default=default, help=text)
        elif name == "no_truncate":
            g.add_argument(flag, action="store_true", help=text)
        elif name in ("batch_size", "max_length"):
            g.add_argument(flag, type=int, metavar="N", default=default, help=text)
        elif name == "alpha":
            g.add_argument(flag, type=_alpha, metavar="ALPHA", default=default, help=text)
        elif name == "gamma":
            g.add_argument(flag, type=_gamma, metavar="GAMMA", default=default, help=text)
        elif name == "dtype":
            g.add_argument(flag, choices=("float32", "bfloat16", "float16"), default=default,
                           help=text)
        elif name == "device_map":
            g.add_argument(flag, choices=DEVICE_MAPS, default=default, help=text)
        else:
            g.add_argument(flag, metavar="TEXT" if name == "system_prompt" else None,
                           default=default, help=text)


def verbose_option(p: argparse.ArgumentParser) -> None:
    """-v/--verbose on a subcommand, so `erm -v score` and `erm score -v` both work."""
    # SUPPRESS: no default of the subcommand overwrites the top-level -v
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="one warning per truncated prompt (file:line)")


def model_overrides(args) -> dict:
    """The --system-prompt, --alpha, --gamma, --batch-size and --max-length given: the settings
    they override in every model a command loads (an EndoRM; a SentenceRM takes the ones it
    has, see `srm_overrides`)."""
    return {k: getattr(args, k) for k in ("system_prompt", "alpha", "gamma", "batch_size",
                                          "max_length") if getattr(args, k, None) is not None}


def srm_overrides(args) -> dict:
    """`model_overrides` a SentenceRM takes (it has no α or γ)."""
    return {k: v for k, v in model_overrides(args).items() if k not in ("alpha", "gamma")}


def check_device(name) -> None:
    """A clear error for a `--device` torch cannot parse or this machine does not have."""
    if name is None:
        return
    from .. import lm
    try:
        lm.check_device(name)
    except ValueError as exc:
        raise CLIError(f"--{exc}") from None


def check_device_map(args) -> None:
    """--device-map: not with --device, not under torchrun (every rank would spread its copy
    over all the GPUs), a model name or directory to load, and accelerate installed."""
    if getattr(args, "device_map", None) is None:
        return
    flag = f"--device-map {args.device_map}"
    if getattr(args, "device", None) is not None:
        raise CLIError(f"{flag}: give --device or --device-map, not both")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise CLIError(f"{flag} spreads one model over all visible GPUs; it cannot run under "
                       "torchrun, which gives each rank its own GPU (leave one of them out)")
    if not getattr(args, "model", None):
        raise CLIError(f"{flag} needs --model: the embedded default model fits on one device")
    if importlib.util.find_spec("accelerate") is None:
        raise CLIError(f"{flag} needs accelerate: pip install 'erm[models]'")


def check_text(value, flag: str) -> None:
    """A CLIError when a text given on the command line is not Unicode text: a byte that is
    not UTF-8 reaches Python as a lone surrogate (\\udc80-\\udcff), which no tokenizer takes."""
    if isinstance(value, str):
        bad = next((c for c in value if 0xD800 <= ord(c) <= 0xDFFF), None)
        if bad is not None:
            what = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF \
                else f"a lone surrogate \\u{ord(bad):04x}"
            raise CLIError(f"{flag}: not valid UTF-8 text ({what})")


def check_model_options(args) -> None:
    """Every model option given, checked before anything is loaded: --batch-size >= 1,
    --max-length >= 2, a finite α >= 1e-4 and finite γ (parsed as such; checked again here for
    a namespace built by hand), a --device this machine has, a usable --device-map, a
    --system-prompt that is Unicode text."""
    check_text(getattr(args, "system_prompt", None), "--system-prompt")
    batch = getattr(args, "batch_size", None)
    if batch is not None and batch < 1:
        raise CLIError(f"--batch-size must be at least 1, got {batch}")
    max_length = getattr(args, "max_length", None)
    if max_length is not None and max_length < 2:
        raise CLIError(f"--max-length must be at least 2 (one context token and one response "
                       f"token), got {max_length}")
    for name, check in (("alpha", lambda v: check_alpha(v, "--alpha")), ("gamma", check_gamma)):
        value = getattr(args, name, None)
        if value is not None:
            try:
                check(value)
            except (TypeError, ValueError) as exc:
                raise CLIError(f"--{exc}" if name == "gamma" else str(exc)) from None
    check_device(getattr(args, "device", None))
    check_device_map(args)


# ----------------------------------------------------------------------------- outputs

def check_out(path: str, suffixes=None, flag="--out") -> Path:
    """An output path that can be written: the right suffix, not a directory, in an existing
    writable directory. Returns it as a Path."""
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise CLIError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if stream_fd(path) is not None or (p.exists() and not p.is_dir() and not p.is_file()):
        return p  # standard output, a FIFO, a device: written in place, nothing created beside
    if p.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; give a file name")
    target = Path(os.path.realpath(p))  # a symlink is written through to its target
    parent = target.parent
    if not parent.exists():
        raise CLIError(f"{flag} {path}: directory {p.parent} does not exist")
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: {p.parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: directory {p.parent} is not writable")
    return p


def check_not_input(data, out: Path, flag="--out") -> None:
    """Refuse an output that is the input file (under any spelling, symlink or hard link)."""
    if data is None or not isinstance(data, (str, os.PathLike)):
        return
    same = os.path.realpath(data) == os.path.realpath(out)
    if not same and os.path.exists(data) and os.path.exists(out):
        try:
            same = os.path.samefile(data, out)
        except OSError:
            pass
    if same:
        raise CLIError(f"{flag} {out} is the input file --data {data}; it would be overwritten "
                       "(write to another file)")


_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/thread-self/fd|proc/(\d+)/fd)/(\d+)$")
_STD_PATHS = {"/dev/stdout": 1, "/dev/stderr": 2}


def stream_fd(path) -> Optional[int]:
    """The file descriptor of this process that output path `path` names, or None: 1 for `-`
    and /dev/stdout, 2 for /dev/stderr, N for /dev/fd/N or /proc/self/fd/N, also through a chain
    of symlinks. Writing there must go through the descriptor already open (`atomic_output`):
    opening the name again would truncate the file a shell redirected it to, and a rename would
    replace that file."""
    p = str(path)
    if p == "-":
        return 1
    p = os.path.abspath(p)
    for _ in range(40):  # the kernel's own limit on a chain of symlinks
        if p in _STD_PATHS:
            return _STD_PATHS[p]
        m = _FD_PATH.match(p)
        if m and (m.group(1) is None or int(m.group(1)) == os.getpid()):
            return int(m.group(2))
        try:
            link = os.readlink(p)
        except OSError:  # not a symlink (or one this process may not read)
            return None
        p = os.path.normpath(os.path.join(os.path.dirname(p), link))
    return None


def _copy_to_fd(src, fd: int) -> None:
    """The bytes of file `src` appended to open descriptor `fd` at its current offset (after
    Python's own buffered stdout / stderr)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with open(src, "rb") as f, os.fdopen(os.dup(fd), "wb", closefd=True) as dst:
        shutil.copyfileobj(f, dst, 1 << 20)


#: errors of the disk rather than of erm: reported as one line naming the output
DISK_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO")
                        if hasattr(errno, n))


def disk_error(path, exc: OSError) -> "CLIError":
    """The CLIError for an OSError met while writing `path` (a full disk, a quota, a read-only
    file system, ...): one line naming the file and what the system said."""
    return CLIError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path` (same suffix) to write; on success it replaces
    `path` in one rename, on failure it is removed and `path` is left as it was. Only a regular
    file (or a new one) is replaced: standard output (`-`, /dev/stdout, /dev/fd/N: see
    `stream_fd`) gets the bytes through the descriptor already open, so `>> log` appends and
    nothing is truncated; another special file (a FIFO, /dev/null) is written in place. A full
    disk (`DISK_ERRNOS`) while writing is a CLIError naming `path`."""
    fd = stream_fd(path)
    try:
        if fd is not None:
            tmp = _temp_beside(Path(tempfile.gettempdir()) / Path(str(path)).name)
            try:
                yield tmp
                _copy_to_fd(tmp, fd)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        elif Path(path).exists() and not Path(path).is_file():
            yield Path(path)
        else:
            yield from _replacing(Path(os.path.realpath(path)))
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(path, exc) from None
        raise


def _replacing(target: Path):
    """atomic_output for a regular file: a temporary file beside `target`, renamed over it."""
    tmp = _temp_beside(target)
    try:
        yield tmp
        if target.exists():
            mode = target.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _temp_beside(target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                               suffix=f".tmp{target.suffix}")
    os.close(fd)
    return Path(tmp)


def json_text(obj, what: str, **kw) -> str:
    """`erm.jsonio.dumps` for the command line: what erm writes for a user is JSON, never the
    NaN / Infinity literals; a non-finite number is a CLIError naming `what` and its key path
    (e.g. "the report: methods.endorm_sum.accuracy is nan")."""
    try:
        return jsonio.dumps(obj, what, **kw)
    except jsonio.NonFiniteJSON as e:
        raise CLIError(str(e)) from None


def read_text(path, flag: str) -> str:
    """The UTF-8 text of the file `path` given to `flag`; a CLIError naming the line that is
    not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path}: no such file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CLIError(f"{flag} {path}: line {line}: not valid UTF-8") from None
