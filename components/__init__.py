"""KFP component definitions for stage1-pro: thin, typed shells around the library.

Each component imports ``stage1_pro`` inside its body (lightweight Python components run in
the stage1-pro image, where the package is installed) and calls one library function.
"""
