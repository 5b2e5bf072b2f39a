"""Build: compiles the Cython fast path and generates the gRPC stubs from proto/ (never committed)."""

import pathlib

from setuptools import Command, setup
from Cython.Build import cythonize

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"


def generate_stubs(out_dir: pathlib.Path) -> None:
    """Runs protoc (grpc_tools) on every proto/points/**/*.proto into out_dir/points/... ."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    for package in {pathlib.Path(p).parent for p in protos}:
        for level in [package, *package.parents][:-1]:
            (out_dir / level / "__init__.py").touch()


class BuildProto(Command):
    """`python setup.py build_proto`: regenerate the stubs in place."""

    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        generate_stubs(ROOT)


# The stubs are generated on every build, before setuptools looks for the `points` package they form.
generate_stubs(ROOT)

setup(
    ext_modules=cythonize(
        [
            "fastpath/records.pyx",
            "fastpath/lot_chain.pyx",
            "fastpath/_core.pyx",
            "fastpath/copy_binary.pyx",
            "fastpath/idempotency_table.pyx",
            "fastpath/intake.pyx",
            "fastpath/kernel_rows.pyx",
            "fastpath/balances.pyx",
            "fastpath/log_columns.pyx",
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    cmdclass={"build_proto": BuildProto},
)
