#!/bin/sh
echo "$GREETING (built $(uname -m))"
