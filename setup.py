"""Ships the repository's ``conf/`` tree inside the package (``rtda/conf``) in wheels and non-editable installs,
so that ``pip install rtda-*.whl`` (or from git) composes runs without the repository. The repository's
``conf/`` stays the one place configs are edited; an editable install reads it directly."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "conf"
        if source.is_dir() and not self.editable_mode:
            target = Path(self.build_lib) / "rtda" / "conf"
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
