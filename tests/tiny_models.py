"""The tiny model builder lives in the package (fedsoda_mpi/tiny.py: the smoke check builds one too); the tests
import it from here as before."""
from fedsoda_mpi.tiny import *  # noqa: F401,F403
from fedsoda_mpi.tiny import _corpus, build_model, build_tokenizer, model_config  # noqa: F401
