"""edgemesh.testbed"""
