"""edgemesh.identity"""
