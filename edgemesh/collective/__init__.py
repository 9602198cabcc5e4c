"""edgemesh.collective"""
