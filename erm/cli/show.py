"""`erm show`: a response coloured token by token by its endogenous reward (HTML or an image)."""
from .models import load_rm, load_srm
from .options import (CLIError, atomic_output, check_model_options, check_out, check_text, log,
                      model_options, read_text)


def cmd_show(args, rm=None) -> int:
    """`erm show`: the response coloured token by token by its endogenous reward."""
    from ..show import show
    check_model_options(args)
    out = check_out(args.out, (".html", ".htm", ".png", ".svg", ".pdf"))
    prompt = args.prompt
    if args.prompt_file:
        prompt = read_text(args.prompt_file, "--prompt-file")
    response = args.response
    if args.response_file:
        response = read_text(args.response_file, "--response-file")
    if prompt is None or response is None:
        raise CLIError("give --prompt (or --prompt-file) and --response (or --response-file)")
    check_text(prompt, "--prompt")
    check_text(response, "--response")
    if not response.strip():
        raise CLIError("the response is empty")
    rm = (load_srm(args) if rm is None else None) or load_rm(args, rm)
    with atomic_output(out) as tmp:
        show(rm, prompt, response, tmp)
    log(args, f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    """Register `erm show` on an argparse subparsers object."""
    p = sub.add_parser("show", help="colour a response token by token by its reward",
                       description="Render the per-token endogenous rewards of a response (and "
                                   "its sentence rewards) as a self-contained HTML page or a PNG.")
    p.add_argument("--prompt", help="the prompt (one user turn)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file")
    p.add_argument("--response", help="the response to score")
    p.add_argument("--response-file", metavar="FILE", help="read the response from a file")
    p.add_argument("--out", required=True, metavar="tokens.html|tokens.png")
    model_options(p, ("model", "system_prompt", "alpha", "gamma", "device", "dtype"), srm=True)
    p.set_defaults(func=cmd_show)
