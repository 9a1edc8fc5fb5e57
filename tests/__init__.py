"""blipfast's tests. The tree mirrors the package (tests/kernels tests blipfast/kernels, tests/train
blipfast/train, ...; tests of top-level modules sit here); tests/parity compares with the original
BLIP code, tests/dist holds the scripts multi-process tests launch, tests/helpers.py what several
files share. Packages, so that tests import shared code as `tests.helpers`, `tests.dist.train_common`
(pytest.ini puts the repository root on sys.path; child processes get it from helpers.repo_env)."""
