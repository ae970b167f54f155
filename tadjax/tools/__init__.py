"""tadjax.tools"""
