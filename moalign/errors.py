"""One exception type for bad user input: the CLI prints its message as a one-line error."""


class MoalignError(ValueError):
    """Bad input or configuration; the message names the problem."""


class SettingError(MoalignError):
    """A bad value of one named setting: ``RMOD: lam must be > 0, got 0`` from Python; the command line says
    the same with the flag's name (:meth:`as_flag`: ``--lam must be > 0, got 0``)."""

    def __init__(self, owner: str, name: str, problem: str):
        self.owner, self.name, self.problem = owner, name, problem
        super().__init__(f"{owner}: {name} {problem}")

    def as_flag(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.problem}"


class ForeignSettingError(SettingError):
    """A setting the chosen method does not have (another method's): never silently dropped."""

    def __init__(self, method: str, name: str, owners: list[str]):
        self.method, self.owners = method, list(owners)
        super().__init__(method, name, "")
        self.args = (
            f"{method} has no setting {name!r} (it belongs to {', '.join(owners)}): remove it or choose that method",
        )

    def __str__(self) -> str:
        return self.args[0]

    def as_flag(self) -> str:
        return (f"--method {self.method} has no --{self.name.replace('_', '-')} (it belongs to "
                f"{', '.join(self.owners)}): remove it or choose that method")  # fmt: skip
