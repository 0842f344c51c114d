from .edlnet import *
from .converted import *
