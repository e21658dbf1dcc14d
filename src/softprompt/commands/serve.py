"""`softprompt serve`: load the model and the prompts its flags name, then serve them over HTTP until
interrupted.

The app itself (endpoints, micro-batching, limits) is `softprompt.serving.server`'s; this module turns
`ServeArgs` into the loaded `PromptBank`, the app's settings and a bound socket, and runs uvicorn.
"""

from __future__ import annotations

from softprompt.commands.flags import ServeArgs
from softprompt.errors import UserError
from softprompt.inference.bank import load_model_and_prompts
from softprompt.serving.schemas import Limits
from softprompt.serving.server import bind_socket, create_app, parse_prompt_specs


def run(args: ServeArgs) -> int:
    """Load the model and prompts named by the flags, then serve until interrupted; return 0."""
    import uvicorn

    specs = parse_prompt_specs(args.prompt)
    if not specs:
        raise UserError("give at least one --prompt NAME=DIR to serve")
    bank = load_model_and_prompts(
        args.model,
        [d for _, d in specs],
        random_init=args.random_init,
        seed=args.seed,
        names=[n for n, _ in specs],
        bf16=args.precision == "bf16",
        allow_other=args.allow_other_base_model,
        fast_path=args.fast_path,
    )
    app = create_app(
        bank,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_new_tokens=args.max_target_length,
        bf16=args.precision == "bf16",
        limits=Limits(
            max_context_chars=args.max_context_chars,
            max_question_chars=args.max_question_chars,
            max_inputs=args.max_inputs,
        ),
        classify=args.classify,
    )
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"softprompt serve: {len(bank)} prompt(s) ({', '.join(bank.names)}) on {bank.device}; "
        f"listening on http://{shown}:{port}",
        flush=True,
    )
    config = uvicorn.Config(
        app, log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=5
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
