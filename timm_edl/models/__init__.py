from .edlnet import *
