"""Build: compiles the Cython fast path and generates the gRPC stubs from proto/ (never committed)."""
import pathlib

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from Cython.Build import cythonize

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"


def generate_stubs(out_dir: pathlib.Path) -> None:
    """Runs protoc (grpc_tools) on every proto/points/**/*.proto into out_dir/points/... ."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    for package in {pathlib.Path(p).parent for p in protos}:
        for level in [package, *package.parents][:-1]:
            (out_dir / level / "__init__.py").touch()


class BuildProto(Command):
    """`python setup.py build_proto`: generate the stubs in place (for development and tests)."""
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        generate_stubs(ROOT)


class BuildPyWithProto(build_py):
    def run(self):
        generate_stubs(ROOT)
        super().run()


class DevelopWithProto(develop):
    def run(self):
        generate_stubs(ROOT)
        super().run()


setup(
    ext_modules=cythonize(
        ["fastpath/_core.pyx"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False,
                             "cdivision": True},
    ),
    cmdclass={"build_proto": BuildProto, "build_py": BuildPyWithProto, "develop": DevelopWithProto},
)
