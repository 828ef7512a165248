"""Multi-objective training: gradient combiners (MGDA, MGDA-Decoupled, PCGrad, GroupDRO, ...) and trainers."""
