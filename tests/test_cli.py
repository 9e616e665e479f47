from cli.main import build_parser, main


def test_every_role_registers_a_subcommand() -> None:
    parser = build_parser()
    # argparse keeps subcommands on the subparsers action; every module must set func.
    actions = [a for a in parser._actions if a.dest == "command"]
    assert actions and "version" in actions[0].choices  # type: ignore[attr-defined]


def test_version_prints_and_exits_zero(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == "0.1.0"
