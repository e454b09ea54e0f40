"""``python -m unialign ...`` and the ``unialign`` script: the command line (package ``unialign_cli``)."""


def run() -> None:
    try:
        from unialign_cli.main import main
    except ImportError as e:  # a lean install: the core without the command line's dependencies
        raise SystemExit(f"the unialign command needs its extras ({e}); pip install 'unialign[cli]'") from None
    main()


if __name__ == "__main__":
    run()
