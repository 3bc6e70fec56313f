"""Only here to record, at install time, where the source tree is, so that an installed
liteattn finds <repo>/build/libliteattn.so after `make` without $LITEATTN_LIB. The package
itself is pure Python (see pyproject.toml)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPy(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "liteattn", "_install_info.py")
        with open(target, "w") as f:
            f.write("# written by setup.py at install time\nSOURCE_DIR = %r\n" % HERE)


setup(cmdclass={"build_py": BuildPy})
