"""`softprompt serve`: load the model and the prompts its flags name, then serve them over HTTP until
interrupted.

The app itself (endpoints, micro-batching, limits) is `softprompt.serving.server`'s; this module turns
`ServeArgs` into the loaded `PromptBank`, the app's settings and a bound socket, and runs uvicorn.
"""

from __future__ import annotations

from softprompt.commands.flags import ServeArgs
from softprompt.errors import UserError
from softprompt.inference.bank import default_device, load_model_and_prompts
from softprompt.runtime.precision import announce, with_precision
from softprompt.serving.guard import quiet_repeats, timed_protocol
from softprompt.serving.prompts import PromptStore
from softprompt.serving.schemas import Limits
from softprompt.serving.server import bind_socket, create_app, parse_prompt_specs


def connection_limit(most: int) -> int:
    """`--max_connections`, lowered to leave 64 file descriptors of the open-file limit (`ulimit -n`) free
    for the model's files and the server's own, so a flood of connections never meets EMFILE."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return most
    return max(1, min(most, soft - 64))


def run(args: ServeArgs) -> int:
    """Load the model and prompts named by the flags, then serve until interrupted; return 0."""
    import uvicorn

    specs = parse_prompt_specs(args.prompt)
    if not specs and args.prompt_root is None:
        raise UserError("give at least one --prompt NAME=DIR to serve, or a --prompt_root to load them from")
    args, precision = with_precision(args, default_device())
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
    store = PromptStore(bank, dict(specs), root=args.prompt_root, max_resident=args.max_resident_prompts)
    app = create_app(
        bank,
        store=store,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_new_tokens=args.max_target_length,
        bf16=args.precision == "bf16",
        batching=args.batching,
        max_batch_tokens=args.max_batch_tokens,
        limits=Limits(
            max_context_chars=args.max_context_chars,
            max_question_chars=args.max_question_chars,
            max_inputs=args.max_inputs,
        ),
        classify=args.classify,
    )
    sock = bind_socket(args.host, args.port)
    announce(precision)  # with the start line, once the model is loaded and the port bound
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"softprompt serve: {len(bank)} prompt(s) ({', '.join(bank.names)}) on {bank.device}; "
        f"listening on http://{shown}:{port}",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
        http=timed_protocol(args.read_timeout, connection_limit(args.max_connections)),
    )
    quiet_repeats()  # after uvicorn's logging setup: an error repeated in a loop logs once per 10 s
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
