"""edgemesh.transport"""
